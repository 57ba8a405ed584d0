"""The table of every config key with its default and meaning (docs/config.md's, which a test keeps
in step with the specs): `python -m toolkit.config` prints it."""

from toolkit.config import spec
from toolkit.config.files import short
from toolkit.config.keys import KEYS


def markdown_table():
    """Every key of KEYS with its default and meaning, as a Markdown table (docs/config.md's, checked by a
    test so it never drifts): `python -m toolkit.config`."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, node, group in spec.leaves(KEYS):
        meaning = node.meaning or (group.meaning if group else "")
        allowed = node.allowed()
        if allowed:  # a list takes any of them, other keys one
            names = (", " if isinstance(node.default, list) else " | ").join(a for a in allowed if a)
            meaning = f"{names}: {meaning}" if meaning else names
        meaning = meaning.replace("|", "\\|").replace("<", "&lt;")
        rows.append(f"| `{key}` | `{short(node.default) if node.default != '' else repr('')}` | {meaning} |")
    return "\n".join(rows)
