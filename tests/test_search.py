"""Hyperparameter search (Optuna), parallel sweeps and searches, and jobs that requeue themselves.

The trials train tests/recipes/line.py, whose validation loss falls with the learning rate, for a
second or so each; most of a trial's time is the start of its process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, free_port, launch, ok, read_jsonl, run_dirs, summary, wait_until

optuna = pytest.importorskip("optuna")

import launch as launch_module  # noqa: E402
from toolkit.jobs import pool  # noqa: E402

LINE = REPO / "tests" / "recipes" / "line.py"
SPACE = "optim.lr=loguniform(1e-3,0.3)"


def study(folder):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    return optuna.load_study(study_name="search", storage=storage).get_trials()


def start(args, cwd, env=None):
    """launch.py in the background, in a session of its own (so that a test can kill it and its trials)."""
    return subprocess.Popen([sys.executable, str(REPO / "launch.py"), *map(str, args)], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


# ---------------------------------------------------------------------------------------------
# A search

def test_search_prunes_records_failures_and_its_best_config_reproduces(tmp_path):
    # 1. Eight trials, two at a time. With this seed the sampler proposes (by trial number) the
    #    learning rates .0231 .0568 .0053 .0184 .163 .166 .0020 .0033: trials 4 and 5 are above
    #    fail_above and fail; trials 6 and 7 are below every trial that finishes, so the median
    #    pruner (after 2 finished trials) stops them at their first validation, however the eight
    #    interleave.
    result = ok(launch(["search", LINE, SPACE, "fail_above=0.1", f"output_dir={tmp_path}", "--trials", 8,
                        "--parallel", 2, "--startup_trials", 2, "--sampler_seed", 3], cwd=tmp_path))
    (folder,) = (tmp_path / "line").glob("search-*")
    trials = study(folder)
    states = {t.number: t.state.name for t in trials}
    assert len(trials) == 8 and [t.number for t in trials] == list(range(8))
    assert states[4] == states[5] == "FAIL" and states[6] == states[7] == "PRUNED"
    assert states[0] == states[1] == "COMPLETE"

    # 2. A pruned trial stopped early, cleanly: its folder says pruned, it exited with 0.
    table = {r["trial"]: r for r in json.loads((folder / "search.json").read_text())}
    for number in (6, 7):
        run = folder / "line" / f"trial-{number:04d}"
        assert summary(run)["status"] == "pruned" and summary(run)["steps"] == 8  # of 3 epochs x 8 steps
        assert table[number]["status"] == "pruned"  # no "(exit N)"
    # A failing trial is recorded as failed, with its error, and the search went on past it.
    assert table[4]["status"] == "failed (exit 1)" and summary(folder / "line" / "trial-0004")["status"] == "failed"
    assert "ValueError: optim.lr=0.16" in (folder / "console" / "trial-0004.txt").read_text()

    # 3. The table: finished trials best first, then pruned, then failed; printed and saved.
    ranked = json.loads((folder / "search.json").read_text())
    finished = [r for r in ranked if r["status"] == "finished"]
    assert [r["best"] for r in finished] == sorted(r["best"] for r in finished)
    assert [r["status"].split()[0] for r in ranked] == sorted((r["status"].split()[0] for r in ranked),
                                                              key=["finished", "pruned", "failed"].index)
    printed = result.stdout.splitlines()
    header = printed.index((folder / "search.txt").read_text().splitlines()[0])
    assert [line.split()[0] for line in printed[header + 1:header + 9]] == [f"#{r['trial']}" for r in ranked]

    # 4. The best trial's config, given to a new run, reproduces its result exactly.
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert best.number == 1 and ranked[0]["trial"] == 1
    # (One weight and batches of 32: nothing here is split over threads, so the trial's share of the
    # cores and this run's cannot make the numbers differ.)
    trial_run = folder / "line" / "trial-0001"
    ok(launch([LINE, "--config", folder / "best.yaml", f"output_dir={tmp_path / 'again'}"], cwd=tmp_path))
    (again,) = run_dirs(tmp_path / "again")
    assert summary(again)["best"]["value"] == summary(trial_run)["best"]["value"] == best.value

    # 5. The history of the study as a picture (launch.py plot FOLDER).
    assert launch_module.main(["plot", str(folder)]) == 0
    assert (folder / "history.png").read_bytes().startswith(b"\x89PNG")


def test_a_killed_search_resumes_and_ends_with_exactly_its_trials(tmp_path):
    # 1. Two trials, one after the other; kill the search and its trial (SIGKILL, as when a machine
    #    is lost) once the second trial has saved its first checkpoint.
    args = ["search", LINE, SPACE, "step_seconds=0.05", f"output_dir={tmp_path}", "--trials", 2, "--pruner", "none"]
    first = start(args, tmp_path)
    checkpoint = lambda: next(iter((tmp_path / "line").glob("search-*/line/trial-0001/checkpoints/latest")), None)
    try:
        wait_until(checkpoint, what="the second trial's first checkpoint")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    (folder,) = (tmp_path / "line").glob("search-*")
    assert [t.state.name for t in study(folder)] == ["COMPLETE", "RUNNING"]

    # 2. --resume finds that nobody runs the second trial any more and continues it from its checkpoint.
    result = ok(launch(["search", "--resume", folder], cwd=tmp_path))
    trials = study(folder)
    assert [t.number for t in trials] == [0, 1] and all(t.state.name == "COMPLETE" for t in trials)
    assert "[trial 1] continued" in result.stdout and "[trial 0]" not in result.stdout
    log = (folder / "line" / "trial-0001" / "log.txt").read_text()
    assert "resumed from" in log and summary(folder / "line" / "trial-0001")["steps"] == 24
    assert len(run_dirs(folder)) == 2 and len(json.loads((folder / "search.json").read_text())) == 2


def test_two_search_processes_share_one_study(tmp_path):
    # 1. A search of three trials, one at a time; 2. a second process joins it as soon as it exists.
    first = start(["search", LINE, SPACE, "step_seconds=0.05", f"output_dir={tmp_path}", "--trials", 3,
                   "--pruner", "none"], tmp_path)
    wait_until(lambda: list((tmp_path / "line").glob("search-*/settings.json")), what="the search folder")
    (folder,) = (tmp_path / "line").glob("search-*")
    second = start(["search", "--resume", folder], tmp_path)
    outputs = finish(first) + finish(second)

    # 3. Three trials in all (the two asked for the last one at about the same time), each run once,
    #    by one of the two; both took part.
    trials = study(folder)
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs["driver"] for t in trials}) == 2
    for number in range(3):
        assert outputs.count(f"[trial {number}] started") == 1
        log = (folder / "line" / f"trial-{number:04d}" / "log.txt").read_text()
        assert log.count("| recipe ") == 1 and "resumed" not in log
    assert len(run_dirs(folder)) == 3


# ---------------------------------------------------------------------------------------------
# Parallel sweeps

def test_sweep_runs_k_at_a_time_each_on_its_share_of_the_cores(tmp_path):
    """Each run is forked from a pre-imported interpreter, and its DataLoader workers start as those of
    `python launch.py` do: forked, with the recipe's data as it is (here a lambda, fetch_seconds', that
    workers started by a forkserver could not unpickle)."""
    where = tmp_path / "where"
    where.mkdir()
    result = ok(launch(["sweep", LINE, "optim.lr=0.01,0.05", "epochs=1", "num_workers=1", "fetch_seconds=0.001",
                        f"where={where}", f"output_dir={tmp_path}", "--parallel", 2], cwd=tmp_path))
    (folder,) = (tmp_path / "line").glob("sweep-*")
    assert [r["status"] for r in json.loads((folder / "sweep.json").read_text())] == ["finished", "finished"]
    assert len(list((folder / "console").glob("*.txt"))) == 2
    seen = [json.loads(p.read_text()) for p in sorted(where.glob("*.json"))]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:  # each run on its own half of the cores, with as many threads
        assert [s["threads"] for s in seen] == [len(cores) // 2] * 2
        assert not set(seen[0]["cores"]) & set(seen[1]["cores"])
    assert "on CPU " in result.stdout


# ---------------------------------------------------------------------------------------------
# Preemptible jobs

def test_a_slurm_job_requeues_itself_and_continues_its_run(tmp_path):
    # Stand-ins for srun (runs its command here), scontrol (records what it was asked) and torchrun
    # (runs launch.py in this process: one process per machine, without torchrun's start-up time;
    # the real torchrun passes SIGTERM on to its processes the same way).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "torchrun").write_text('#!/bin/sh\nwhile [ "$1" != launch.py ]; do shift; done\nexec python "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.txt\n'
                                      '[ "$1" = show ] && echo 127.0.0.1\nexit 0\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lenet", "SLURM_NNODES": "1",
           "SLURM_NODEID": "0", "SLURM_GPUS_PER_NODE": "1", "SLURM_JOB_NODELIST": "node1",
           "MAIN_PORT": str(free_port())}
    job = ["bash", REPO / "accelerate_configs" / "slurm.sh", LINE, "step_seconds=0.1", "epochs=2", "log_every=2",
           f"output_dir={tmp_path / 'runs'}"]
    run = tmp_path / "runs" / "line" / "lenet-4242"  # <job name>-<job id>: the same after a requeue

    # 1. SLURM warns the job (SIGTERM to the batch script) while it trains: the run saves and stops,
    #    and the job requeues itself.
    first = subprocess.Popen(list(map(str, job)), cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text(),
               what="the run's first steps")
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode != 0, out[-3000:]
    assert summary(run)["status"] == "interrupted", out[-3000:]
    assert (tmp_path / "scontrol.txt").read_text().splitlines()[-1] == "requeue 4242"
    stopped_at = summary(run)["steps"]
    assert 0 < stopped_at < 16

    # 2. SLURM starts the same job again: it continues the same folder and finishes, without requeueing.
    again = subprocess.run(list(map(str, job)), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert summary(run)["status"] == "finished" and summary(run)["steps"] == 16
    assert f"step {stopped_at})" in (run / "log.txt").read_text()  # "resumed from ... step N)"
    assert run_dirs(tmp_path / "runs") == [run]
    assert (tmp_path / "scontrol.txt").read_text().count("requeue") == 1
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"] == [8, 16]


def test_autoresume_needs_a_name(tmp_path, capsys):
    assert launch_module.main([str(LINE), f"output_dir={tmp_path}", "--autoresume"]) == 2
    assert capsys.readouterr().err == f"error: --autoresume needs name=..., the run's identity: its folder is " \
                                      f"{tmp_path}/line/<name>\n"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written

@pytest.mark.parametrize("space, message", [
    ("optim.lr=loguniform(1e-1,1e-4)", "optim.lr=loguniform(1e-1,1e-4): the low bound 0.1 must be below the high "
                                       "bound 0.0001"),
    ("optim.lrr=loguniform(1e-4,1e-1)", "unknown key 'optim.lrr' from the search space; closest valid keys: "
                                        "optim.lr, optim.lr_mult, optim"),
    ("batch_size=uniform(16,64)", "batch_size=uniform(16,64): batch_size takes int values, not uniform ones; use "
                                  "int(...) or logint(...)"),
    ("optim.name=choice(adam,rmsprop)", "optim.name: 'rmsprop' is not one of adamw, adam, sgd"),
    ("optim.lr=loguniform(0,1)", "optim.lr=loguniform(0,1): a log scale needs a low bound above 0"),
    ("epochs=int(2)", "epochs=int(2): expected int(low,high) with two integers"),
])
def test_a_bad_space_is_one_line_naming_the_key(space, message, tmp_path, capsys):
    assert launch_module.main(["search", str(LINE), space, f"output_dir={tmp_path / 'runs'}"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "runs").exists()


def test_search_without_optuna_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` fails as if it were not installed
    assert launch_module.main(["search", str(LINE), SPACE, f"output_dir={tmp_path / 'runs'}"]) == 2
    assert capsys.readouterr().err == "error: search needs optuna: pip install -e '.[search]'\n"
    assert not (tmp_path / "runs").exists()


def test_more_parallel_runs_than_gpus_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pool, "gpus", lambda: ["0", "1"])
    for command in (["search", str(LINE), SPACE], ["sweep", str(LINE), "optim.lr=0.01,0.02,0.03"]):
        assert launch_module.main([*command, f"output_dir={tmp_path / 'runs'}", "--parallel", "3"]) == 2
        assert capsys.readouterr().err == ("error: --parallel 3 needs 3 GPUs, one per run, but this machine shows 2 "
                                           "(CUDA_VISIBLE_DEVICES=0,1); use --parallel 2 or fewer\n")
    assert not (tmp_path / "runs").exists()


def test_a_forked_run_is_what_python_would_start_but_pre_imported(tmp_path):
    """Sweeps and searches on CPUs fork their runs from a forkserver that imported torch, accelerate
    and the toolkit once: a run must see its arguments, environment, directory, cores and threads,
    and give its exit status, as `python SCRIPT` in a fresh process would."""
    script = tmp_path / "script.py"
    script.write_text(
        "import json, os, sys\n"
        "preloaded = 'torch' in sys.modules\n"
        "import torch\n"
        "print(json.dumps({'preloaded': preloaded, 'argv': sys.argv, 'cwd': os.getcwd(), 'path': sys.path[0],\n"
        "                  'env': os.environ.get('MINLOOP_X'), 'threads': torch.get_num_threads(),\n"
        "                  'cores': sorted(os.sched_getaffinity(0))}))\n"
        "sys.exit(3)\n")
    (tmp_path / "work").mkdir()
    env = {**os.environ, "MINLOOP_X": "y", "OMP_NUM_THREADS": "1"}
    run = pool.forked([str(script), "a", "b"], env, cwd=str(tmp_path / "work"), cores={0},
                          output=tmp_path / "out.txt")
    wait_until(lambda: run.poll() is not None, what="the forked script's end")
    assert run.poll() == 3
    assert json.loads((tmp_path / "out.txt").read_text()) == {
        "preloaded": True, "argv": [str(script), "a", "b"], "cwd": str(tmp_path / "work"), "path": str(tmp_path),
        "env": "y", "threads": 1, "cores": [0]}


def test_the_training_loop_knows_nothing_of_searches():
    """A trial's reporting enters the loop as a hook from launch.py: importing the loop imports no
    search, trial, space, sweep, jobs or process pool."""
    code = "import sys, toolkit.loop; print(sorted(m for m in sys.modules if m.startswith('toolkit.')))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert not {"toolkit.jobs.search", "toolkit.jobs.trial", "toolkit.jobs.space", "toolkit.jobs.sweep", "toolkit.jobs.launching",
                "toolkit.jobs.pool"} & set(eval(loaded))
