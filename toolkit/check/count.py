"""The sample count with 2 processes: the check runs in one process, so for it the `samples`
property starts `torchrun` with 2 (on CPUs, gloo) that run `launch.py check --counts-to=FILE`
(`counts_main`), and reads their counts back, or names their error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from toolkit.check.rows import Failed
from toolkit.check.work import Check, eval_splits, evaluation, first_error
from toolkit.jobs.launching import LAUNCH


def in_two_processes(check):
    """{split: metrics} of an evaluation of each eval split in 2 processes (torchrun, on
    this machine's CPUs unless it has 2 GPUs)."""
    out = check.folder / "counts.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if torch.cuda.device_count() < 2:
        env["ACCELERATE_USE_CPU"] = "1"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(LAUNCH), "check", str(check.recipe.path),
            *[f"--config={file}" for file in check.files], *check.overrides, f"--counts-to={out}",
            *([f"--counts-weights={trained}"] if (trained := check.trained()) else [])]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise Failed(f"the evaluation in 2 processes failed: {first_error(done.stderr) or done.returncode}",
                     "the end of their console follows; --processes 1 leaves the count with 2 processes out",
                     console=done.stderr)
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
