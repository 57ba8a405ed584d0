"""Checkpoints: exact resume, atomic saves, safe loading, interrupts, test and init_from."""

import json
import os
import random
import signal
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import Shared, tiny_args
from helpers import (CPU, LENET, PROBE, REPO, assert_same_weights, copy_run, launch, launch_two, ok, only_run,
                     read_jsonl, records, start, summary, two_processes, wait_until, weights)
from toolkit import UserError
from toolkit.run.summary import Status, Summary
from toolkit.state import checkpoint
from toolkit.state.weights import load_weights


def comparable(records):
    """metrics.jsonl without what depends on the clock or on the process (its memory)."""
    measured = ("time", "samples_per_s", "data_wait", "rss_gb", "peak_allocated_gb", "peak_reserved_gb")
    return [{k: v for k, v in r.items() if k not in measured} for r in records]


@pytest.mark.parametrize("stop", ["epochs=1", "max_steps=45"], ids=["after-epoch", "mid-epoch"])
def test_resume_equals_the_unbroken_run(ema_run, tmp_path, stop):
    """1. `ema_run` trained 3 epochs unbroken (with an EMA, and a checkpoint every 10 steps);
    2. train the same run but stop (after epoch 1, or at step 45 of 96, in the middle of epoch 2);
    3. resume it to 3 epochs; 4. compare weights, EMA weights and metrics."""
    ok(launch([*ema_run.args, f"output_dir={tmp_path / 'stopped'}", stop], cwd=tmp_path))
    stopped = only_run(tmp_path / "stopped")
    state = checkpoint.read_state(checkpoint.find(stopped))
    assert (state.epoch, state.batch) == ((1, 0) if stop == "epochs=1" else (1, 13))
    ok(launch(["resume", stopped, "epochs=3", "max_steps=0"], cwd=tmp_path))

    unbroken = ema_run.run
    assert_same_weights(weights(stopped), weights(unbroken))  # bitwise
    ema = [load_file(checkpoint.find(run) / "ema.safetensors") for run in (stopped, unbroken)]
    assert_same_weights(*ema)  # the EMA too
    # A run that max_steps ends mid-epoch validates there (its end): the unbroken run did not. A run
    # that ends at step 32 (epochs=1) logs its last train window there (steps 31-32 of log_every=5),
    # and the resumed run the rest of it (33-35): the unbroken run logged 31-35 at once.
    its_end = [r for r in read_jsonl(stopped / "metrics.jsonl") if r["split"] != "train" and r["step"] == 45]
    assert [r["split"] for r in its_end] == ([] if stop == "epochs=1" else ["val", "val_ema"])
    cut = {32, 35} if stop == "epochs=1" else set()

    def kept(run):
        return comparable(r for r in read_jsonl(run / "metrics.jsonl")
                          if r not in its_end and not (r["split"] == "train" and r["step"] in cut))

    assert kept(stopped) == kept(unbroken)
    assert sum(r["samples"] for r in records(stopped, "train")) == 3 * 1999 == \
        sum(r["samples"] for r in records(unbroken, "train"))
    assert summary(stopped)["best"]["value"] == summary(unbroken)["best"]["value"]
    assert summary(stopped)["test"] == summary(unbroken)["test"]
    assert "resumed from" in (stopped / "log.txt").read_text()


@pytest.mark.parametrize("stop", ["epochs=1", "max_steps=12"], ids=["after-epoch", "mid-epoch"])
def test_two_process_resume_sees_the_same_batches_and_randomness(probe_run, tmp_path, stop):
    """Per rank, the resumed run trains on exactly the remaining batches, in the same order, with
    the same augmentation draws, and ends with the unbroken run's weights.

    1. `probe_run` trained 2 epochs of 8 steps unbroken on 2 processes; 2. the same run stops
    (after epoch 1, or at step 12); 3. it resumes to the end; 4. compare the ranks' records and weights."""
    ok(launch_two([*probe_run.args, f"probe={tmp_path / 's'}", f"output_dir={tmp_path / 'stopped'}", stop],
                  cwd=tmp_path))
    stopped = only_run(tmp_path / "stopped")
    ok(launch_two(["resume", stopped, "epochs=2", "max_steps=0"], cwd=tmp_path))

    for rank in (0, 1):
        assert open(f"{tmp_path / 's'}.rank{rank}").read() == open(f"{probe_run.probe}.rank{rank}").read()
    assert_same_weights(weights(stopped), weights(probe_run.run))
    steps = [r["step"] for r in read_jsonl(stopped / "metrics.jsonl")]
    assert steps == sorted(set(steps))  # monotonic, nothing twice


def test_best_latest_keep_and_export(ema_run, tmp_path):
    """`ema_run` saved every 10 steps, kept 2 (and the best one); then `test` evaluates checkpoints."""
    run = copy_run(ema_run.run, tmp_path)  # `test` writes its results into the run folder
    final = summary(run)
    names = [p.name for p in checkpoint.complete(run)]
    best = final["best"]["checkpoint"]
    assert names[-2:] == ["step-0000090", "step-0000096"] and best in names
    assert len(names) == 2 + (best not in names[-2:])  # the newest two, and the best one
    assert os.readlink(run / "checkpoints" / "latest") == "step-0000096"
    assert os.readlink(run / "checkpoints" / "best") == best
    assert not list((run / "checkpoints").glob(".tmp-*"))

    # model.safetensors: the best weights, loadable with safetensors + the recipe's model(cfg)
    sys.path.insert(0, str(REPO / "recipes"))
    import lenet

    exported = load_file(run / "model.safetensors")
    assert_same_weights(exported, weights(run, "best"))
    lenet.model(None).load_state_dict(exported)

    # `test` evaluates a checkpoint and saves the result
    out = ok(launch(["test", run, "--checkpoint", "latest"], cwd=tmp_path)).stdout.strip()
    assert out.startswith(f"test accuracy={final['test']['accuracy']:.6g} ")
    saved = json.loads((run / "test-step-0000096.json").read_text())
    assert saved["test"] == final["test"] and saved["step"] == 96
    assert "val accuracy=" in ok(launch(["test", run, "--split", "val"], cwd=tmp_path)).stdout


@pytest.fixture(scope="module")
def one_epoch_run(mnist_root, tmp_path_factory):
    """LeNet, 1 epoch at lr 3e-4 with no monitor (so no best checkpoint): one checkpoint, step-0000032."""
    return Shared(tmp_path_factory, "one-epoch",
                  [LENET, *tiny_args(mnist_root), "epochs=1", "optim.lr=3e-4", "checkpoint.monitor="])


def test_resume_refuses_changes_to_the_model_or_data(one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run.run, tmp_path)
    refused = launch(["resume", run, "optim.lr=0.1", "epochs=2"], cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: resuming {run} with a different optim.lr (0.0003 -> 0.1) would")
    assert "--force" in refused.stderr
    assert summary(run)["epochs"] == 1  # nothing ran
    ok(launch(["resume", run, "optim.lr=0.1", "epochs=2", "--force"], cwd=tmp_path))
    assert summary(run)["epochs"] == 2


def test_a_position_past_the_end_of_a_shorter_epoch_goes_on_with_the_next(tiny, tmp_path):
    """A checkpoint at batch 20 of 32, resumed with batches twice as large (16 to an epoch): that
    epoch is over, and the run trains the next one in full (it used to train nothing, ever)."""
    ok(launch([LENET, *tiny, "epochs=2", "max_steps=20"], cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    result = ok(launch(["resume", run, "max_steps=0", "batch_size=128", "--force"], cwd=tmp_path))
    assert "epoch 1 had no batch left after the checkpoint's position (batch 20" in result.stderr
    assert (summary(run)["status"], summary(run)["epochs"], summary(run)["steps"]) == ("finished", 2, 20 + 16)


def test_resume_needs_a_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    (tmp_path / "lenet.py").write_text((REPO / "recipes" / "lenet.py").read_text())
    result = launch(["resume", tmp_path], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path} has no complete checkpoint in {tmp_path / 'checkpoints'}\n"


def test_init_from_a_run(lenet_run, tiny, tmp_path):
    source = copy_run(lenet_run.run, tmp_path / "a")  # `test` writes its results into the run folder
    best = ok(launch(["test", source], cwd=tmp_path)).stdout.split(" | ")[0]
    ok(launch([LENET, *tiny, "epochs=0", f"init_from={source}", f"output_dir={tmp_path / 'b'}"], cwd=tmp_path))
    run = only_run(tmp_path / "b")
    assert f"test {' '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in summary(run)['test'].items())}" == best
    assert "init_from" in (run / "log.txt").read_text() and "missing keys none" in (run / "log.txt").read_text()


def test_init_from_is_not_strict_and_names_the_keys(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    save_file({"0.weight": torch.ones(3, 2), "extra": torch.zeros(1)}, tmp_path / "w.safetensors")
    missing, unexpected = load_weights(model, tmp_path / "w.safetensors")
    assert missing == ["0.bias", "1.weight", "1.bias"] and unexpected == ["extra"]
    assert torch.equal(model[0].weight, torch.ones(3, 2))


def files_of(run):
    """{path: bytes} of a run folder's files, outside its checkpoints."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "checkpoints" not in p.parts}


@pytest.mark.parametrize("damage", ["train_state.json", "model.safetensors"])
def test_a_damaged_checkpoint_is_one_clear_line(one_epoch_run, tmp_path, damage):
    run = copy_run(one_epoch_run.run, tmp_path)
    path = checkpoint.find(run) / damage
    path.write_bytes(path.read_bytes()[:40])  # cut short, as a full disk would leave it
    before = files_of(run)
    for command in (["resume", run, "epochs=2"], ["test", run]):
        result = launch(command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert f"{path} " in result.stderr or f"{path}:" in result.stderr, result.stderr  # names the file
    assert files_of(run) == before


def test_test_uses_the_latest_checkpoint_when_there_is_no_best(one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run.run, tmp_path)
    printed = ok(launch(["test", run], cwd=tmp_path)).stdout
    assert f"| checkpoint latest ({checkpoint.find(run).name}) |" in printed
    refused = launch(["test", run, "--checkpoint", "best"], cwd=tmp_path)
    assert refused.returncode == 2 and "has no best checkpoint yet" in refused.stderr


class CreatesAFile:
    """A pickle that runs code on load: it creates `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("target", ["random_states_0.pkl", "optimizer.bin", "custom_checkpoint_0.pkl"])
def test_a_crafted_checkpoint_runs_no_code(one_epoch_run, tmp_path, target):
    run = copy_run(one_epoch_run.run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save(CreatesAFile(marker), checkpoint.find(run) / target)

    before = files_of(run)
    result = launch(["resume", run, "epochs=2"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert target in message and ("refusing" in message or "cannot load" in message), message
    assert files_of(run) == before  # a resume that fails leaves the run as it was
    ok(launch(["test", run], cwd=tmp_path))  # only reads safetensors
    assert not marker.exists()

    evil = tmp_path / "evil.pt"
    torch.save(CreatesAFile(marker), evil)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_weights(torch.nn.Linear(1, 1), evil)
    assert not marker.exists()


def test_kill_9_during_saves_never_leaves_a_broken_latest(tiny, tmp_path):
    """Save every step and kill -9 the process 6 times, at random moments and inside saves: `latest`
    is always a complete, loadable checkpoint, and the run still resumes to the end.

    Each time: 1. start the run (the first time) or resume it; 2. wait until it has saved a newer
    checkpoint than the last one seen; 3. kill -9 it, every other time at a random moment and
    otherwise as soon as a save is under way (its `.tmp-*` folder exists: a random moment alone
    misses every save on a fast disk); 4. check that `latest` is complete and loadable. 5. Finally
    resume it to the end of the epoch after the one it was killed in (epochs is resumable: 40 only
    keeps it from ending early)."""
    rng = random.Random(0)
    args = [LENET, *tiny, "epochs=40", "checkpoint.every_steps=1", "checkpoint.keep=2", "trackers=[]"]
    runs = tmp_path / "runs"
    run, last_step, mid_save = None, 0, 0

    def saved_a_newer_checkpoint():
        nonlocal run
        run = run or next(iter(runs.glob("*/*")), None)
        latest = checkpoint.complete(run) if run else []
        return bool(latest) and checkpoint.read_state(latest[-1]).step > last_step

    def saving():
        return any((run / "checkpoints").glob(".tmp-*"))

    for attempt in range(6):
        process = start(args, cwd=tmp_path, output=False)
        wait_until(saved_a_newer_checkpoint, process, what="a newer checkpoint")
        if attempt % 2:
            wait_until(saving, process, what="a save under way")
        else:
            time.sleep(rng.uniform(0, 0.2))  # a random moment, at most 0.2 s later
        process.kill()
        process.wait()
        mid_save += saving()  # killed while writing one

        latest = checkpoint.find(run)  # complete ...
        state = checkpoint.read_state(latest)
        assert state.step >= last_step
        last_step = state.step
        load_file(latest / "model.safetensors")  # ... and loadable
        torch.load(latest / "optimizer.bin", weights_only=True)
        args = ["resume", run]
    assert last_step < 40 * 32, "the run finished before the kills were done; make it longer"
    assert mid_save >= 1, "no kill landed inside a save"
    epochs = checkpoint.read_state(checkpoint.find(run)).epoch + 1
    ok(launch(["resume", run, "checkpoint.every_steps=0", f"epochs={epochs}"], cwd=tmp_path))
    assert summary(run)["status"] == "finished" and summary(run)["steps"] == epochs * 32


def first_log_line(run_root):
    """A condition: a run under `run_root` has written its first line of metrics.jsonl."""
    return lambda: any(p.stat().st_size for p in run_root.glob("*/*/metrics.jsonl"))


@pytest.fixture(scope="module")
def signal_args(mnist_root):
    # A warmup and a cosine decay (the recipe's kind of schedule): the LR must continue too.
    return [LENET, *tiny_args(mnist_root), "epochs=4", "batch_size=8", "optim.lr=3e-4", "sched.name=cosine",
            "sched.warmup_epochs=0.5"]


@pytest.fixture(scope="module")
def signal_unbroken(signal_args, tmp_path_factory):
    return Shared(tmp_path_factory, "unbroken", signal_args)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_saves_then_resume_finishes_like_the_unbroken_run(signal_args, signal_unbroken, tmp_path, sig):
    """1. `signal_unbroken` trained 4 epochs unbroken; 2. the same run gets the signal after its
    first log line: it saves and exits with 128 + the signal's number; 3. it resumes to the end;
    4. its weights are the unbroken run's, and so are its train log's windows: every log_every=5
    steps, the stop's window carried on by the resumed run."""
    process = start([*signal_args, f"output_dir={tmp_path / 'stopped'}"], cwd=tmp_path)
    wait_until(first_log_line(tmp_path / "stopped"), process, what="the first log line")
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, err
    run = only_run(tmp_path / "stopped")
    assert summary(run)["status"] == "interrupted" and summary(run)["signal"] == sig.name
    stopped_at = checkpoint.read_state(checkpoint.find(run)).step
    assert 0 < stopped_at < 4 * 250
    assert f"stopped by {sig.name} at step {stopped_at}; continue with: python launch.py resume {run}" in err

    ok(launch(["resume", run], cwd=tmp_path))
    assert summary(run)["status"] == "finished"
    assert_same_weights(weights(run), weights(signal_unbroken.run))
    resumed, unbroken = records(run, "train"), records(signal_unbroken.run, "train")
    assert [(r["step"], r["samples"], r["accuracy"]) for r in resumed] == \
        [(r["step"], r["samples"], r["accuracy"]) for r in unbroken]
    assert [r["step"] for r in resumed] == [*range(5, 1001, 5)]  # not cut by the stop, the saves, the epochs
    # the loss summed in another order
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in unbroken], rel=1e-6)


def test_a_sigterm_while_the_run_records_its_end_does_not_kill_it(tiny, tmp_path, monkeypatch):
    """When one process fails, the launcher sends SIGTERM to the others, which may be recording their
    end at that moment (that another process failed, and why): they must finish saying it."""
    write = Summary.write

    def write_then_signal(summary, run_dir):
        write(summary, run_dir)
        if summary.status != Status.RUNNING:  # the last write, as the run ends
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Summary, "write", write_then_signal)
    ok(launch([LENET, *tiny, "debug.fast_run=true"], cwd=tmp_path))  # this process lives on
    assert summary(only_run(tmp_path / "runs"))["status"] == "finished"


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step(tmp_path):
    """1. start a 2-process run of 3 x 256 steps; 2. SIGTERM the launcher after the first log line
    (step 50): both ranks stop after the same step and save; 3. resume it on 2 processes to the end."""
    args = [PROBE, "batch_size=2", "samples=1024", "epochs=3", "trackers=[]", "checkpoint.monitor=",
            f"probe={tmp_path / 'p'}", f"output_dir={tmp_path / 'runs'}"]
    process = start(args, cwd=tmp_path, launcher=two_processes(), env=CPU)
    wait_until(first_log_line(tmp_path / "runs"), process, what="the first log line")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    run = only_run(tmp_path / "runs")
    assert summary(run)["status"] == "interrupted"
    state = checkpoint.read_state(checkpoint.find(run))
    # Both ranks stopped after the same step: each recorded exactly that many steps.
    for rank in (0, 1):
        steps = len(open(f"{tmp_path / 'p'}.rank{rank}").readlines())
        assert steps == state.step

    ok(launch_two(["resume", run], cwd=tmp_path))
    assert summary(run)["status"] == "finished" and summary(run)["steps"] == 3 * 256
