import pytest

from helpers import LENET
from toolkit import UserError, recipe


def write(tmp_path, text, name="task.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_lenet_meets_the_contract():
    module = recipe.load(LENET)
    assert module.name == "lenet" and module.config["data"]["name"] == "mnist"
    assert all(callable(getattr(module, f)) for f in ("datasets", "model", "loss", "metrics"))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found: .*nope.py"):
        recipe.load(tmp_path / "nope.py")


def test_not_a_python_file(tmp_path):
    with pytest.raises(UserError, match="a recipe is a Python file"):
        recipe.load(write(tmp_path, "", "task.yaml"))


def test_missing_functions_are_named(tmp_path):
    path = write(tmp_path, "def model(cfg):\n    pass\n")
    with pytest.raises(UserError, match=r"must define datasets\(\), loss\(\)"):
        recipe.load(path)


def test_config_must_be_a_dict(tmp_path):
    path = write(tmp_path, "config = [1]\ndef datasets(c): pass\ndef model(c): pass\ndef loss(m, b, c): pass\n")
    with pytest.raises(UserError, match="`config` must be a dict, got list"):
        recipe.load(path)


def test_config_is_optional(tmp_path):
    path = write(tmp_path, "def datasets(c): pass\ndef model(c): pass\ndef loss(m, b, c): pass\n")
    assert recipe.load(path).config == {}


def test_functions_must_take_the_contract_arguments(tmp_path):
    path = write(tmp_path, "def datasets(cfg): pass\ndef model(cfg): pass\ndef loss(model, batch): pass\n")
    with pytest.raises(UserError, match=r"loss must be a function loss\(model, batch, cfg\)"):
        recipe.load(path)


LINE_LOSS = 'return F.mse_loss(model(x), y), {"samples": len(x)}'


@pytest.mark.parametrize("returned, said", [
    ('return F.mse_loss(model(x), y, reduction="none"), {"samples": len(x)}',
     "must return a loss of one element, the batch's mean (the toolkit backpropagates it); it returned a tensor "
     "of shape (32, 1) (float32)"),
    ("return F.mse_loss(model(x), y)", "must return (loss, counts), e.g. (F.cross_entropy(logits, y), "
     "{'samples': len(y), 'correct': (logits.argmax(1) == y).sum()}); it returned a tensor of shape () (float32)"),
    ('return F.mse_loss(model(x), y), {"samples": len(x), "kind": "mse"}',
     "returned the count 'kind' as str 'mse': a count is a number or a tensor of one element"),
    ('return F.mse_loss(model(x), y), {"samples": len(x), "hits": (model(x) > 0).float()}',
     "returned the count 'hits' as a tensor of shape (32, 1) (float32): a count is a number or a tensor of one "
     "element"),
    ('return F.mse_loss(model(x), y), {"n": len(x)}', "must return counts with a 'samples' entry"),
], ids=["not-a-scalar", "no-tuple", "text-count", "per-sample-count", "no-samples"])
def test_a_loss_that_breaks_the_contract_ends_in_one_line_naming_it(tmp_path, returned, said):
    """Each way a recipe's loss() can break the contract ends the run before any step, in one line
    that names the recipe's loss and what it returned (not backward's or an all-reduce's traceback)."""
    from helpers import REPO, launch

    text = (REPO / "tests" / "recipes" / "line.py").read_text()
    assert LINE_LOSS in text
    broken = write(tmp_path, text.replace(LINE_LOSS, returned))
    result = launch([broken, "sanity_val_batches=0", f"output_dir={tmp_path / 'runs'}"], cwd=tmp_path)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: the recipe's loss() ({broken}) ") and said in line
    assert "Traceback" not in result.stderr
