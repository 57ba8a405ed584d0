"""Experiment tracking: metrics.jsonl and Accelerate's trackers (tensorboard, wandb).

Every logged train window and evaluation goes to both through `Metrics.log`, on the main process:
one JSON object per line in <run>/metrics.jsonl, and the same numbers to each tracker, whose files
are in the run folder too (tensorboard/, wandb/).
"""

import json
import netrc
import os
import time
import uuid
from urllib.parse import urlparse

from toolkit import UserError
from toolkit.config import flatten


def make_trackers(cfg, run_dir, state):
    """Accelerate's trackers for `cfg.trackers` (given to `Accelerator(log_with=...)`), made here so
    that each writes into the run folder and continues on resume: tensorboard drops its events
    after the checkpoint's step; wandb resumes the same run (its id is kept in the checkpoint)."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    if "tensorboard" in cfg.trackers:
        purge = {"purge_step": state.step + 1} if state.step else {}
        trackers.append(TensorBoardTracker("tensorboard", run_dir, **purge))  # <run>/tensorboard
    if "wandb" in cfg.trackers:
        state.tracker_ids.setdefault("wandb", uuid.uuid4().hex[:12])
        w = cfg.wandb
        # A key left empty is left to wandb, which reads its WANDB_* variable (entity, group), or
        # given the variable's value here, where the toolkit has a default of its own.
        trackers.append(WandBTracker(
            w.project or os.environ.get("WANDB_PROJECT") or "minloop", name=run_dir.name,
            id=state.tracker_ids["wandb"], resume="allow", dir=w.dir or os.environ.get("WANDB_DIR") or str(run_dir),
            mode=wandb_mode(cfg), entity=w.entity or None, group=w.group or None,
            config={k: str(v) if isinstance(v, list) else v for k, v in flatten(cfg).items()}))
    return trackers


def wandb_mode(cfg):
    """wandb.mode, else $WANDB_MODE, else online."""
    return cfg.wandb.mode or os.environ.get("WANDB_MODE") or "online"


def check_trackers(cfg):
    """Before any run folder is made: wandb online needs credentials (wandb would otherwise fail
    after the run started, with a traceback)."""
    if "wandb" not in cfg.trackers or wandb_mode(cfg) != "online" or _wandb_credentials():
        return
    raise UserError("trackers has wandb in online mode, but no wandb credentials were found: run `wandb login`, "
                    "set WANDB_API_KEY, or use wandb.mode=offline (or WANDB_MODE=offline) to log without an account")


def _wandb_credentials():
    """Whether wandb will find an API key: where wandb itself looks (its variables, then ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Metrics:
    """metrics.jsonl plus Accelerate's trackers (tensorboard, wandb): one call logs to all; as a
    context manager, closes them all at its end.

    On resume, `keep_lines` cuts metrics.jsonl back to what the checkpoint had seen, and tensorboard
    drops its events from `first_step` on, so nothing logged after the checkpoint appears twice.
    """

    def __init__(self, accelerator, run_dir, keep_lines=None):
        self.accelerator = accelerator
        self.file, self.lines = None, 0
        if accelerator.is_main_process:
            path = run_dir / "metrics.jsonl"
            if keep_lines is not None:
                kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep_lines] if path.exists() else []
                path.write_text("".join(kept), encoding="utf-8")
            self.file = open(path, "a", encoding="utf-8")
            self.lines = keep_lines or 0
        self.start = time.time()
        accelerator.init_trackers("runs")  # starts the trackers made by make_trackers

    def log(self, split, metrics, step, epoch):
        if self.file is not None:
            record = {"step": step, "epoch": epoch, "split": split, **metrics,
                      "time": round(time.time() - self.start, 3)}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.lines += 1
        self.accelerator.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Flush and close metrics.jsonl and every tracker (e.g. tensorboard's event files)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
