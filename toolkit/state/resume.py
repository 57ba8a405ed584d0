"""What a resume continues and what it may change: the policy of `launch.py resume` and of
`launch.py RECIPE --autoresume`.

The weights, optimizer, RNG, data position, step and best metric come from the checkpoint. The
config is the run's config.yaml plus what the command line changes, which may only touch keys
that leave the model and the data as they were (`keys.resumable`) unless `force`; a key that
resizes an LR schedule spanning the training is allowed, with a warning.
"""

import os
import sys
from pathlib import Path

from toolkit import UserError, config, recipe as recipes
from toolkit.config import keys
from toolkit.state import checkpoint


def load_run(path):
    """A run folder and the copy of the recipe it ran with."""
    run = Path(path)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml in it)")
    copies = sorted(run.glob("*.py"))
    if len(copies) != 1:
        raise UserError(f"{run} should hold one copy of its recipe (*.py); found {len(copies)}")
    return run, recipes.load(copies[0])


def resumed_config(run, recipe, files=(), overrides=(), force=False):
    """The config of a resumed run: its config.yaml, then `files` and `overrides`, within the policy."""
    saved = config.resolve(recipe.config, [run / "config.yaml"])
    cfg = config.resolve(recipe.config, [run / "config.yaml", *files], overrides)
    if saved.auto_batch_size and cfg.auto_batch_size:  # the sizes it found stand (--autoresume repeats the command)
        cfg = cfg.replace(batch_size=saved.batch_size, grad_accum=saved.grad_accum)
    changed = [f"{key} ({old} -> {new})" for key, old, new in config.changes(cfg, saved) if not keys.resumable(key)]
    if changed and not force:
        raise UserError(f"resuming {run} with a different {', '.join(changed)} would change the model or the "
                        f"data of a run half done; start a new run, or pass --force to resume anyway")
    resized = [f"{key} {old} -> {new}" for key, old, new in config.changes(cfg, saved)
               if key in ("epochs", "max_steps")]
    from toolkit.optim import SCHEDULES  # imports torch, which a refused resume does not need

    if resized and SCHEDULES[cfg.sched.name].over_training and os.environ.get("RANK", "0") == "0":
        print(f"warning: {', '.join(resized)} resizes the {cfg.sched.name} LR schedule, which is a function of the "
              f"training length: the LR jumps to where the new schedule is at the checkpoint's step", file=sys.stderr)
    return cfg


def autoresume_folder(recipe, cfg):
    """`--autoresume`: the run's folder, <output_dir>/<recipe>/<name>, if it has a checkpoint to
    continue from, else None (a new run starts there). The run's identity is its name: the same
    command continues it wherever it stopped."""
    if not cfg.name:
        raise UserError("--autoresume needs name=..., the run's identity: its folder is "
                        f"{cfg.output_dir}/{recipe.name}/<name>")
    run = Path(cfg.output_dir) / recipe.name / cfg.name
    return run if checkpoint.complete(run) else None
