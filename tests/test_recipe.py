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
