"""The sample count with 2 processes: the check runs in one process, so for it the `samples`
property starts 2 that run `launch.py check --counts-to=FILE` (`counts_main`) on gloo, and reads
their counts back, or names their error. On a machine without GPUs they are forks of the
pre-imported forkserver that a sweep's runs come from (`pool.forked_ranks`), else `torchrun`'s."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from toolkit.check.rows import Failed
from toolkit.check.work import Check, eval_splits, evaluation, first_error
from toolkit.jobs import pool
from toolkit.jobs.launching import LAUNCH


def in_two_processes(check):
    """{split: metrics} of an evaluation of each eval split in 2 processes (on this machine's CPUs
    unless it has 2 GPUs)."""
    out = check.folder / "counts.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if torch.cuda.device_count() < 2:
        env["ACCELERATE_USE_CPU"] = "1"
    trained = check.trained()
    argv = [str(LAUNCH), "check", str(check.recipe.path), *[f"--config={file}" for file in check.files],
            *check.overrides, f"--counts-to={out}", *([f"--counts-weights={trained}"] if trained else [])]
    if pool.gpus():
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               *argv], env=env, capture_output=True, text=True)
        status, console = done.returncode, done.stderr
    else:
        console_file = check.folder / "counts-console.txt"
        console_file.unlink(missing_ok=True)
        status = pool.wait_ranks(pool.forked_ranks(argv, 2, env, output=(os.devnull, console_file)))
        console = console_file.read_text() if console_file.is_file() else ""
    if status != 0 or not out.is_file():
        raise Failed(f"the evaluation in 2 processes failed: {first_error(console) or status}",
                     "the end of their console follows; --processes 1 leaves the count with 2 processes out",
                     console=console)
    return json.loads(out.read_text())


def counts_main(recipe, files, overrides, out, weights=None):
    """In each of the 2 processes of `in_two_processes`: evaluate each eval split as `samples`
    does (with `weights`, the check's trained ones), with the recipe's num_workers, and write
    {split: metrics} to `out` from the main process."""
    from toolkit.build import recipe_splits, same_everywhere
    from toolkit.distributed import start_processes

    check = Check(recipe, files, overrides, Path(out).parent, processes=1)
    cfg = check.cfg
    processes, _ = start_processes(cfg)
    check.splits = recipe_splits(recipe, cfg, processes)
    same_everywhere(check.splits, processes)
    limits = {split: check.reading(check.splits[split])[0] for split in eval_splits(check.splits)}
    counted = {split: evaluation(recipe, cfg, split, check.splits[split], limit, cfg.num_workers, weights=weights)
               for split, limit in limits.items() if limit is not None}
    if processes.is_main_process:
        Path(out).write_text(json.dumps(counted))
    processes.wait_for_everyone()
    processes.destroy_process_group()  # now: gloo's threads, ended at the interpreter's exit, may abort it
