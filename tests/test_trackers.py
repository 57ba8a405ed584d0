"""The trackers that need a server or an account (aim, comet_ml, clearml, dvclive, swanlab, trackio),
each through a stand-in module with the calls our trackers make: one run per training run, named
after its folder, with the config; a resume continues the same run; every train metric at the step
that metrics.jsonl gives it. (MLflow runs for real: test_research.py.)"""

import importlib.machinery
import os
import subprocess
import sys
import types
import uuid

import pytest

from helpers import LENET, REPO, launch, ok, only_run, records
from toolkit.run import trackers
from toolkit.run.trackers import BaseTracker, _drop_steps_after


class Book:
    """What a stand-in was asked to do: starts [{run, continues, name}], params, logged [(name, step)]."""

    def __init__(self):
        self.starts, self.params, self.logged, self.ends = [], [], [], 0

    def start(self, run, continues, name):
        self.starts.append({"run": run, "continues": continues, "name": name})


def module(name, **attributes):
    m = types.ModuleType(name)
    m.__dict__.update(attributes, __spec__=importlib.machinery.ModuleSpec(name, None))
    return m


def aim(book):
    class RunLockingError(RuntimeError):
        pass

    class Run:
        def __init__(self, run_hash=None, *, repo=None, experiment=None, force_resume=False):
            self.hash = run_hash or uuid.uuid4().hex[:24]
            book.start(self.hash, run_hash is not None, None)

        name = property(lambda self: book.starts[-1]["name"],
                        lambda self, name: book.starts[-1].update(name=name))

        def __setitem__(self, key, values):
            book.params.append(values)

        def track(self, value, name, step=None, **kwargs):
            book.logged.append((name, step))

        def close(self):
            book.ends += 1

    return {"aim": module("aim", Run=Run), "aim.sdk": module("aim.sdk"),
            "aim.sdk.errors": module("aim.sdk.errors", RunLockingError=RunLockingError)}


def comet_ml(book):
    class Experiment:
        def __init__(self, experiment_key, mode, experiment_config, **kwargs):
            book.start(experiment_key, mode == "get_or_create", experiment_config["name"])
            self.step = None

        def log_parameters(self, values):
            book.params.append(values)

        def set_step(self, step):
            self.step = step

        def log_metric(self, name, value, step=None, **kwargs):
            book.logged.append((name, step))

        def end(self):
            book.ends += 1

    return {"comet_ml": module("comet_ml", __version__="3.58.0", start=lambda **kw: Experiment(**kw),
                               ExperimentConfig=lambda **kw: kw)}


def clearml(book):
    class Logger:
        def report_scalar(self, title, series, value, iteration, **kwargs):
            book.logged.append((title, iteration))

    class Task:
        @classmethod
        def init(cls, project_name, task_name, continue_last_task=False, **kwargs):
            task = cls()
            task.id = continue_last_task or uuid.uuid4().hex
            book.start(task.id, bool(continue_last_task), task_name)
            return task

        def connect(self, values, name=None):
            book.params.append(values)

        def get_logger(self):
            return Logger()

        def close(self):
            book.ends += 1

    return {"clearml": module("clearml", Task=Task)}


def dvclive(book):
    class Live:
        def __init__(self, dir, resume=False, **kwargs):  # noqa: A002
            book.start(dir, resume, None)
            self.step = 0

        def log_params(self, values):
            book.params.append(values)

        def log_metric(self, name, value, **kwargs):
            book.logged.append((name, self.step))

        def next_step(self):
            self.step += 1

        def end(self):
            book.ends += 1

    class Metric:
        could_log = staticmethod(lambda value: isinstance(value, (int, float)))

    return {"dvclive": module("dvclive", Live=Live), "dvclive.plots": module("dvclive.plots", Metric=Metric)}


def runs_by_init(name):
    """swanlab and trackio: `init(...)` gives a run with log and finish."""
    def stand_in(book):
        class Run:
            def __init__(self, id=None, name=None, resume=None, config=None, **kwargs):  # noqa: A002
                self.name = name
                book.start(id or name, resume == "allow", name)
                book.params.append(config)

            def log(self, values, step=None, **kwargs):
                book.logged.extend((key, step) for key in values)

            def finish(self):
                book.ends += 1

        return {name: module(name, init=lambda **kw: Run(**kw))}
    return stand_in


STAND_INS = {"aim": aim, "comet_ml": comet_ml, "clearml": clearml, "dvclive": dvclive,
             "swanlab": runs_by_init("swanlab"), "trackio": runs_by_init("trackio")}


@pytest.mark.parametrize("name", STAND_INS)
def test_a_tracker_gets_one_run_per_training_run_continued_on_resume(name, tiny, tmp_path, monkeypatch):
    book = Book()
    for module_name, stand_in in STAND_INS[name](book).items():
        monkeypatch.setitem(sys.modules, module_name, stand_in)
    ok(launch([LENET, *tiny, "epochs=1", f"trackers=[{name}]"], cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    ok(launch(["resume", run, "epochs=2"], cwd=tmp_path))

    first, again = book.starts
    assert again["run"] == first["run"] and again["continues"], book.starts
    if name != "dvclive":  # which names no runs: its folder is in the run folder
        assert first["name"] == again["name"] == run.name
    else:
        assert first["run"] == str(run / "dvclive")
    assert book.ends == 2 and all(params["optim.lr"] == 0.001 for params in book.params)
    steps = [step for metric, step in book.logged if metric == "train/loss"]
    assert steps == [r["step"] for r in records(run, "train")] and max(steps) == 64


def test_a_tracker_that_is_not_installed_is_one_line_before_the_run(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "aim", None)  # as if not installed
    result = launch([LENET, *tiny, "trackers=[aim]"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: trackers has aim, which is not installed: pip install -e '.[aim]'\n"
    assert not (tmp_path / "runs").exists()


def test_dvclive_files_are_cut_back_to_the_checkpoint_on_resume(tmp_path):
    """Steps logged after the checkpoint that a resume starts from are logged again: the old go."""
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t5\t2.0\n2\t10\t1.5\n3\t15\t1.2\n")
    _drop_steps_after(tmp_path, 10)
    assert (tmp_path / "train" / "loss.tsv").read_text() == "timestamp\tstep\tloss\n1\t5\t2.0\n2\t10\t1.5\n"


def test_the_base_starts_a_tracker_on_the_main_process_only(monkeypatch, tmp_path):
    """A tracker built on BaseTracker, in a process that is not the main one, starts no run, logs
    nothing, finishes nothing and keeps no id; in the main one it does each once."""
    calls = []

    class Probe(BaseTracker):
        name = "probe"

        def begin(self, resume):
            calls.append("begin")
            return object(), "probe-1"

        def write(self, values, step):
            calls.append(f"write {step}")

        def end(self):
            calls.append("end")

    def session(main):
        monkeypatch.setattr(trackers, "_main_process", lambda: main)
        state = types.SimpleNamespace(tracker_ids={})
        probe = Probe(None, tmp_path / "run", state)
        probe.start()
        probe.log({"train/loss": 1.0}, step=4)
        probe.finish()
        return state.tracker_ids

    assert session(main=False) == {} and calls == []
    assert session(main=True) == {"probe": "probe-1"} and calls == ["begin", "write 4", "end"]


def test_the_suite_passes_whatever_the_user_s_shell_sets(tmp_path):
    """A wandb test in a shell that sets wandb, MLflow, Hugging Face and Accelerate variables to
    values that would break it (its run logging into the user's WANDB_DIR, or training in fp16 on
    the CPU): the suite's conftest clears them, and nothing is written where they point."""
    user = {"WANDB_DIR": tmp_path / "user-wandb", "WANDB_MODE": "online", "WANDB_PROJECT": "theirs",
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "HF_HOME": tmp_path / "user-hf", "HF_DATASETS_OFFLINE": "0",
            "ACCELERATE_MIXED_PRECISION": "fp16", "CUDA_VISIBLE_DEVICES": "0"}
    for folder in (user["WANDB_DIR"], user["HF_HOME"] / "accelerate"):
        folder.mkdir(parents=True)
    (user["HF_HOME"] / "accelerate" / "default_config.yaml").write_text("mixed_precision: fp16\n")
    test = f"{REPO / 'tests' / 'test_research.py'}::test_wandb_follows_its_environment_and_an_explicit_key_wins"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                             f"--basetemp={tmp_path / 'inner'}", test], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **{key: str(value) for key, value in user.items()}}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert not list(user["WANDB_DIR"].iterdir())
