import pytest

from toolkit import config
from toolkit.config import ConfigError, resolve

RECIPE = {"data": {"name": "mnist", "root": "data"}, "epochs": 3}


def problems(*overrides, files=(), recipe=RECIPE):
    with pytest.raises(ConfigError) as e:
        resolve(recipe, files, overrides)
    return e.value.problems


def write(path, text):
    path.write_text(text)
    return str(path)


def test_layers_later_wins(tmp_path):
    a = write(tmp_path / "a.yaml", "epochs: 5\noptim:\n  lr: 0.1\nseed: 7\n")
    b = write(tmp_path / "b.yaml", "epochs: 6\n")
    cfg = resolve(RECIPE, [a, b], ["seed=8"])
    assert cfg.batch_size == config.DEFAULTS["batch_size"]  # toolkit default
    assert cfg.data.name == "mnist"                          # recipe key
    assert cfg.optim.lr == 0.1 and cfg.optim.name == "adamw"  # file, merged into the defaults
    assert cfg.epochs == 6                                   # the later file
    assert cfg.seed == 8                                     # the command line


def test_recipe_overrides_defaults_and_adds_keys():
    cfg = resolve(RECIPE)
    assert cfg.epochs == 3 and cfg.data.root == "data"
    assert problems(recipe={"epochs": "ten"}) == [
        "epochs: expected an integer, got 'ten' (str), from the recipe's config"]


@pytest.mark.parametrize("text, value", [
    ("1e-4", 1e-4), ("3e-3", 3e-3), ("1E5", 1e5), ("2", 2.0), ("-.5", -0.5), (".inf", float("inf")),
])
def test_numbers_parse_as_floats(text, value):
    x = resolve({**RECIPE, "x": 0.0}, [], [f"x={text}"]).x
    assert x == value and isinstance(x, float)


def test_yaml_12_scalars(tmp_path):
    f = write(tmp_path / "c.yaml", "name: yes\nseed: 010\nepochs: 0x1F\ndata:\n  root: 12:30\n")
    cfg = resolve(RECIPE, [f])
    assert cfg.name == "yes"        # not a bool (YAML 1.1 would say True)
    assert cfg.seed == 10           # not octal
    assert cfg.epochs == 31
    assert cfg.data.root == "12:30"  # not base-60


def test_booleans_nulls_and_lists():
    recipe = {**RECIPE, "flag": False, "anything": None}
    cfg = resolve(recipe, [], ["flag=true", "anything=null", "trackers=[]"])
    assert cfg.flag is True and cfg.anything is None and cfg.trackers == ()
    assert resolve(recipe, [], ["trackers=[tensorboard]"]).trackers == ("tensorboard",)
    assert problems("flag=1", recipe=recipe) == ["flag: expected true or false, got 1 (int), from the command line"]


def test_text_keys_take_the_text_as_written():
    cfg = resolve(RECIPE, [], ["name=2024", "data.root=1e-4", "data.name="])
    assert cfg.name == "2024" and cfg.data.root == "1e-4" and cfg.data.name == ""


def test_unknown_keys_name_the_closest_valid_ones():
    # More cases, through the real command line: test_cli.py::test_bad_input_from_the_real_command_line
    assert problems("lr=1") == ["unknown key 'lr' from the command line; closest valid keys: optim.lr"]


def test_unknown_keys_in_files_are_errors(tmp_path):
    f = write(tmp_path / "a.yaml", "optim:\n  learning_rate: 0.1\n")
    assert problems(files=[f])[0].startswith(f"unknown key 'optim.learning_rate' from {f}")


def test_wrong_types_name_key_value_and_expected_type():
    assert problems("epochs=ten") == ["epochs: expected an integer, got 'ten' (str), from the command line"]
    assert problems("epochs=1.5") == ["epochs: expected an integer, got 1.5 (float), from the command line"]
    assert problems("optim.lr=fast") == ["optim.lr: expected a number, got 'fast' (str), from the command line"]
    assert problems("trackers=tensorboard")[0].startswith("trackers: expected a list, e.g. [a, b], got 'tensorboard'")
    assert problems("optim=3")[0] == ("optim: expected a mapping with keys name, lr, weight_decay, betas, momentum, lr_mult, "
                                      "got 3 (int), from the command line")


def test_integers_are_accepted_for_float_keys():
    lr = resolve(RECIPE, [], ["optim.lr=1"]).optim.lr
    assert lr == 1.0 and isinstance(lr, float)


def test_choices_and_minimums():
    assert problems("precision=fp8") == ["precision: 'fp8' is not one of no, bf16, fp16"]
    assert problems("trackers=[tensorboard, nope]") == ["trackers: 'nope' is not one of tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio"]
    assert problems("batch_size=0") == ["batch_size: 0 is below the minimum, 1"]


@pytest.mark.parametrize("text", ["lr3e-3", "=3", "optim..lr=1", "a b=1", "optim.lr=[1,"])
def test_malformed_overrides(text):
    (problem,) = problems(text)
    assert problem.startswith("malformed override")


def test_all_problems_are_reported_together(tmp_path):
    f = write(tmp_path / "a.yaml", "epochs: many\n")
    assert len(problems("seed=x", "lr3e-3", "nope=1", files=[f])) == 4


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    f = write(tmp_path / "bad.yaml", "epochs: 3\noptim: {lr: 1\n")
    (problem,) = problems(files=[f])
    assert problem.startswith(f"{f}: invalid YAML at line 3")


def test_missing_and_non_mapping_files(tmp_path):
    assert problems(files=[str(tmp_path / "nope.yaml")]) == [
        f"cannot read config file {tmp_path / 'nope.yaml'}: No such file or directory"]
    f = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert problems(files=[f]) == [f"{f}: expected a mapping of keys at the top level, got [1, 2] (list)"]
    assert resolve(RECIPE, [write(tmp_path / "empty.yaml", "")]) == resolve(RECIPE)


def test_config_is_read_only_and_names_missing_keys():
    cfg = resolve(RECIPE)
    with pytest.raises(AttributeError, match="read-only"):
        cfg.epochs = 4
    with pytest.raises(AttributeError, match="no key 'nope'"):
        cfg.data.nope
    assert cfg["optim"]["lr"] == cfg.optim.lr


def test_diff_lists_what_changed():
    base = resolve(RECIPE)
    assert config.diff(resolve(RECIPE, [], ["epochs=4", "trackers=[]"]), base) == ["epochs=4", "trackers=[]"]
    assert config.diff(base, base) == []


def test_choices_are_the_registries_names():
    """The names that optim.name, sched.name and trackers take are their registries' (toolkit.optim,
    toolkit.run.trackers): each of them works, a name outside them is refused, and the README table shows them."""
    import torch

    from helpers import LENET
    from toolkit import optim, recipe
    from toolkit.run import trackers
    assert set(optim.OPTIMIZERS) == {"adamw", "adam", "sgd"}
    model = torch.nn.Linear(2, 1)
    for name in optim.OPTIMIZERS:
        optimizer, _ = optim.make_optimizer(resolve(RECIPE, [], [f"optim.name={name}"]), model, recipe.load(LENET))
        assert type(optimizer).__name__.lower() == name
    for name in optim.SCHEDULES:
        factor = optim.lr_schedule(resolve(RECIPE, [], [f"sched.name={name}"]), steps_per_epoch=10)
        assert all(0 <= factor(step) <= 1 for step in range(30))
    assert problems("sched.name=nope") == [
        "sched.name: 'nope' is not one of constant, cosine, linear, step, onecycle, exponential"]
    assert problems("trackers=[nope]") == [f"trackers: 'nope' is not one of {', '.join(trackers.TRACKERS)}"]
    assert "| `optim.name` | `adamw` | adamw \\| adam \\| sgd |" in config.markdown_table()


def test_each_key_is_described_once_with_its_rules():
    """A key's default, meaning, choices, minimum, rule and whether a resume may change it come from
    its one spec (keys.KEYS, and a tracker's block in its entry)."""
    from toolkit.config import keys as specs
    from toolkit.config import spec
    keys = {key: node for key, node, _ in spec.leaves(specs.KEYS)}
    assert keys["batch_size"].minimum == 1 and problems("batch_size=0") == ["batch_size: 0 is below the minimum, 1"]
    assert problems("ema.decay=1.0") == ["ema.decay: must be below 1 (e.g. 0.999), or 0 for no EMA"]
    assert problems("optim.lr_mult.features=-1") == [
        "optim.lr_mult: features: expected a number >= 0, got -1"]
    assert specs.resumable("epochs") and specs.resumable("wandb.project") and specs.resumable("notify.email")
    assert not specs.resumable("optim.lr") and not specs.resumable("batch_size")
    assert specs.resumable("data.root") and not specs.resumable("data.name")  # the recipes' own keys
    assert config.DEFAULTS["wandb"]["mode"] == "" and "wandb.mode" in keys
