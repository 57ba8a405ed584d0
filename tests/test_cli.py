"""The command line end to end: train, the run folder, reproduction, and bad input."""

import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import launch
from helpers import (LENET, REPO, accelerate_launch, copy_run, launch as run_launch, ok, only_run, read_jsonl, run_dirs,
                     summary)
from toolkit import config, recipe
from toolkit.config import ConfigError
from toolkit.recipe import RecipeError


def test_training_learns_and_reports(lenet_run):
    """`lenet_run`: LeNet trained 3 epochs on the tiny data (conftest.py), which these tests read."""
    result, run = lenet_run.result, lenet_run.run
    records = read_jsonl(run / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]  # the loss goes down
    final = summary(run)
    assert final["status"] == "finished" and final["epochs"] == 3
    assert final["test"]["samples"] == 1001 and final["val"]["samples"] == 1001
    assert final["test"]["accuracy"] > 0.9
    # One final line on stdout: test accuracy and the run folder.
    last = result.stdout.strip().splitlines()[-1]
    assert re.match(rf"test accuracy={final['test']['accuracy']:.6g} .*\| run {re.escape(str(run))}$", last), last


def test_run_folder_is_complete(lenet_run):
    run = lenet_run.run
    for name in ("config.yaml", "lenet.py", "log.txt", "metrics.jsonl", "summary.json"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "lenet.py").read_text() == (REPO / "recipes" / "lenet.py").read_text()
    lines = [line.split(" ", 2)[2] for line in (run / "log.txt").read_text().splitlines()]  # without the time
    # It opens with what ran, where and on what ...
    assert lines[0].startswith("command: ") and "launch.py" in lines[0] and "epochs=3" in lines[0]
    # The console shows the short lines only (not the command line).
    console = lenet_run.result.stderr
    assert f"run {run} | recipe" in console and "command: " not in console
    assert lines[1].startswith(f"run {run} | recipe {REPO / 'recipes' / 'lenet.py'} | changed from the recipe's "
                               f"config: ") and " epochs=3 " in lines[1] and " data.val_size=1001" in lines[1]
    assert re.fullmatch(r"strategy: 1 process on cpu \| precision no \| python [\d.]+ \| torch \S+ \| accelerate \S+",
                        lines[2]), lines[2]
    assert lines[3] == ("data: train 1999, val 1001, test 1001 | model LeNet5: 61,706 parameters "
                        "(61,706 trainable, 0 frozen)")
    assert lines[4].startswith("model features: Sequential, 2,572 parameters")
    assert "epoch 3/3 step 96 val accuracy=" in "\n".join(lines)
    # ... and closes with the final metrics, the wall time and the folder.
    assert re.fullmatch(rf"test accuracy=\S+ loss=\S+ samples=1001 \| [\d.]+s \| run {re.escape(str(run))}", lines[-1])


def test_metrics_jsonl_has_every_window_and_evaluation(lenet_run):
    run = lenet_run.run
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["split"] for r in records if r["split"] != "train"] == ["val", "val", "val", "test"]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    train = [r for r in records if r["split"] == "train"]
    # A window every log_every=5 steps, across epochs of 32, and the last one at the end: 1999
    # training samples per epoch, every one counted in exactly one train window.
    assert [r["step"] for r in train] == [*range(5, 96, 5), 96]
    assert sum(r["samples"] for r in train) == 3 * 1999
    assert {"loss", "accuracy", "lr", "grad_norm", "samples_per_s", "step", "epoch", "time"} <= set(train[0])


def test_tensorboard_has_the_curves(lenet_run):
    run = lenet_run.run
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/accuracy", "train/lr", "train/grad_norm", "train/samples_per_s", "val/accuracy",
            "test/accuracy"} <= set(tags)
    assert len(events.Scalars("val/accuracy")) == 3


def test_saved_config_reproduces_the_run(lenet_run, tmp_path):
    """config.yaml, given back with --config, gives the same config (also for text that looks like a
    number, a boolean or a time, and for null) and the same results, in a new run folder."""
    run = copy_run(lenet_run.run, tmp_path)  # its output_dir is the shared run's; a copy trains into tmp_path
    result = ok(run_launch([LENET, "--config", run / "config.yaml", f"output_dir={tmp_path / 'runs'}"], cwd=tmp_path))
    assert "torch computes on 1 of" not in result.stderr  # the tests' own OMP_NUM_THREADS=1, not accelerate's
    again = [r for r in run_dirs(tmp_path / "runs") if r != run]
    assert len(again) == 1  # a new folder, never the old one
    assert summary(again[0])["test"] == summary(run)["test"]

    lenet = recipe.load(LENET)
    cfg = config.resolve(lenet.config, [], [*lenet_run.args[1:], f"output_dir={lenet_run.output_dir}"])
    assert config.resolve(lenet.config, [run / "config.yaml"]) == cfg
    assert (cfg.wandb.project, cfg.wandb.group, cfg.wandb.entity, cfg.precision) == ("1e-4", "yes", "12:30", None)
    saved = (run / "config.yaml").read_text()
    assert (again[0] / "config.yaml").read_text() == saved.replace(str(lenet_run.output_dir), str(tmp_path / "runs"))


@pytest.mark.parametrize("config_file", ["accelerate_configs/cpu.yaml", None], ids=["cpu.yaml", "no-config"])
def test_accelerate_launch_runs_the_same_training(lenet_run, tmp_path, config_file):
    """`accelerate launch --config_file accelerate_configs/cpu.yaml`, and plain `accelerate launch`
    on a machine where `accelerate config` never ran, give the plain run's result."""
    run = lenet_run.run
    launcher = accelerate_launch(*(["--config_file", REPO / config_file] if config_file else []))
    # No default config in HF_HOME; without a config, the thread count is Accelerate's to set (the
    # tests' OMP_NUM_THREADS=1 would set it for it).
    env = {"HF_HOME": str(tmp_path / "hf"), **({} if config_file else {"OMP_NUM_THREADS": None})}
    result = ok(run_launch([LENET, "--config", run / "config.yaml", f"output_dir={tmp_path}"], cwd=tmp_path,
                           launcher=launcher, env=env))
    assert summary(only_run(tmp_path))["test"] == summary(run)["test"]  # one thread, as `lenet_run`
    if not config_file:  # Accelerate's default gave the process one CPU thread: the log says so
        assert "torch computes on 1 of" in result.stderr


# ---------------------------------------------------------------------------------------------
# Bad input: exit status 2, one line on stderr, no traceback, no run folder.

def bad_input_cases(tmp_path, mnist_root):
    missing = tmp_path / "no-functions.py"
    missing.write_text("config = {}\ndef model(cfg):\n    pass\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim: {lr: 1\n")
    return {
        "wrong type": ([LENET, "epochs=ten"], "epochs: expected an integer, got 'ten' (str)"),
        "malformed override": ([LENET, "lr3e-3"], "malformed override 'lr3e-3'"),
        "missing recipe": ([tmp_path / "nope.py"], "recipe file not found"),
        "recipe without functions": ([missing], "must define datasets(), loss()"),
        "invalid YAML": ([LENET, "--config", bad_yaml], f"{bad_yaml}: invalid YAML at line 2"),
        "missing data offline": ([LENET, f"data.root={tmp_path / 'empty'}", "data.download=false"],
                                 "mnist data not found: expected train-images-idx3-ubyte[.gz]"),
    }


@pytest.mark.parametrize("case", ["wrong type", "malformed override", "missing recipe",
                                  "recipe without functions", "invalid YAML", "missing data offline"])
def test_bad_input_is_one_line(case, tmp_path, mnist_root, capsys):
    args, expected = bad_input_cases(tmp_path, mnist_root)[case]
    code = launch.main([*map(str, args), f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "runs").exists()


def test_bad_input_from_the_real_command_line(tmp_path):
    """Unknown keys: one line each, with the closest valid keys (or none), and no traceback."""
    result = run_launch([LENET, "optim.lrr=1", "epoch=3", "zzz=1", f"output_dir={tmp_path / 'runs'}"], cwd=tmp_path,
                        fresh=True)  # `python launch.py` itself: its exit status and all it prints
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: unknown key 'optim.lrr' from the command line; closest valid keys: optim.lr, optim.lr_mult, optim",
        "error: unknown key 'epoch' from the command line; closest valid keys: epochs",
        "error: unknown key 'zzz' from the command line",
    ]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError):
        launch.main([LENET, "epochs=ten", "--debug"])


@pytest.mark.parametrize("code, shown", [
    ("import torch\n\nconfig = {}\ndef model(cfg)\n    return None\n",
     ["    def model(cfg)", "SyntaxError: expected ':'"]),
    ("import torch\nimport a_module_nobody_has\n",
     ["Traceback (most recent call last):", "line 2, in <module>", "    import a_module_nobody_has",
      "ModuleNotFoundError: No module named 'a_module_nobody_has'"]),
], ids=["syntax error", "import error"])
def test_a_recipe_that_fails_to_import_shows_its_own_file(tmp_path, capsys, code, shown):
    broken = tmp_path / "broken.py"
    broken.write_text(code)
    assert launch.main([str(broken)]) == 2
    err = capsys.readouterr().err
    assert f'File "{broken}", line' in err
    for line in shown:
        assert line in err.splitlines() or line in err, err
    assert "importlib" not in err and "toolkit" not in err  # none of the toolkit's frames
    with pytest.raises(RecipeError) as everything:  # --debug: the whole traceback, the original as its cause
        launch.main([str(broken), "--debug"])
    assert isinstance(everything.value.__cause__, SyntaxError if "Syntax" in shown[-1] else ModuleNotFoundError)


@pytest.mark.parametrize("command, required", [([], "recipe"), (["test"], "run"), (["resume"], "run"),
                                               (["sweep"], "recipe")])
def test_usage_errors_name_only_what_is_required(capsys, command, required):
    with pytest.raises(SystemExit) as exit_:
        launch.main(command)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: the following arguments are required: {required}")


def test_help_lists_the_commands_and_each_has_its_own(capsys):
    """`launch.py --help` lists every subcommand; `launch.py COMMAND --help` gives that command's
    options; a recipe as the first argument is `train`, as is `train RECIPE`."""
    assert launch.main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(re.search(rf"^\s+{name}\s+\S", listed, re.M) for name in launch.COMMANDS)
    for command, option in (["train", "--autoresume"], ["test", "--split"], ["search", "--pruner"],
                            ["check", "--processes"]):
        with pytest.raises(SystemExit) as exit_:
            launch.main([command, "--help"])
        assert exit_.value.code == 0 and option in capsys.readouterr().out
    with pytest.raises(SystemExit):
        launch.main(["train"])  # `train` with no recipe: the same usage error as without the word
    assert capsys.readouterr().err.splitlines()[-1].endswith("the following arguments are required: recipe")
