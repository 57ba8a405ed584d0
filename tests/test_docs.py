"""The documentation: the README is a short front page that starts with the two commands, every
guide in docs/ is linked from it, every relative link leads somewhere, and the table of keys is
the one the specs make."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
GUIDES = sorted((REPO / "docs").glob("*.md"))

INSTALL = ("apt-get update && apt-get install -y dataset-fashion-mnist python3-venv && python3 -m venv .venv && "
           ". .venv/bin/activate && pip install -e . && python launch.py recipes/lenet.py data.name=fashion_mnist "
           "data.root=/usr/share/datasets/fashion-mnist")
TESTS = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && python -m pytest"
FIRST_BLOCK = ("```bash\n"
               "# 1. Install, then train LeNet-5 on Fashion-MNIST on the CPU (Debian/Ubuntu as root; otherwise prefix "
               "apt-get with sudo)\n"
               f"{INSTALL}\n\n"
               "# 2. Run the tests\n"
               f"{TESTS}\n"
               "```\n")

LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text):
    """The text without its fenced code blocks and inline code, where a `# ...` or `[..](..)` is code."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`]*`", "", text)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    seen, found = {}, set()
    text = re.sub(r"^```.*?^```[ \t]*$", "", path.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")  # GitHub numbers repeats: a, a-1
        seen[base] = seen.get(base, 0) + 1
    return found


def relative_links(path):
    return [target for target in LINK.findall(prose(path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)]  # http:, https:, mailto: lead elsewhere


def test_readme_is_a_front_page_of_at_most_350_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= 350, f"README.md has {lines} lines: move the detail into a guide in docs/"


def test_readme_starts_with_the_two_commands():
    """The first thing after the opening is the two commands, exactly; CI runs the second one."""
    readme = README.read_text()
    first = readme.index("```")
    assert "\n## " not in readme[:first], "README.md: the two commands must come before the first section"
    assert readme[first:].startswith(FIRST_BLOCK), "README.md's first block is not the two commands as they were"
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == TESTS, ".ci/run must run the README's test command, exactly"


def test_every_guide_is_linked_from_the_readme():
    assert GUIDES, "docs/ has no guide"
    linked = {target.split("#")[0] for target in relative_links(README)}
    missing = [guide.name for guide in GUIDES if f"docs/{guide.name}" not in linked]
    assert not missing, f"README.md links to no docs/{missing}"


def test_every_relative_link_leads_to_a_file_and_heading():
    broken = []
    for page in [README, *GUIDES]:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
                broken.append(f"{page.relative_to(REPO)}: {target}: no heading #{anchor} in {file.name}")
    assert not broken, "\n".join(broken)


def test_the_data_guide_holds_the_four_recipes():
    """tests/conftest.py's `recipes` runs them as written there."""
    data = (REPO / "docs" / "data.md").read_text()
    section = data[data.index("## Your own data"):]
    names = re.findall(r"```python\n# (my_\w+\.py)\n(.*?)```", section, re.S)
    assert [name for name, _ in names] == ["my_tensors.py", "my_images.py", "my_stream.py", "my_lm.py"]


def test_the_config_guide_lists_every_key_with_its_default():
    from toolkit.config.table import markdown_table
    guide = (REPO / "docs" / "config.md").read_text()
    assert markdown_table() in guide, "docs/config.md's key table is stale: python -m toolkit.config"
