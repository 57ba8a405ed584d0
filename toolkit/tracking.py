"""Experiment tracking: metrics.jsonl and Accelerate's trackers (TRACKERS: tensorboard, wandb).

Every logged train window and evaluation goes to both through `Metrics.log`, on the main process:
one JSON object per line in <run>/metrics.jsonl, and the same numbers to each tracker, whose files
are in the run folder too (tensorboard/, wandb/).
"""

import dataclasses
import json
import netrc
import os
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlparse

from toolkit import UserError
from toolkit.spec import Key


@dataclasses.dataclass(frozen=True)
class Tracker:
    """One name of `trackers=[...]`: how to make it, and what it needs."""
    make: Callable  # (cfg, run_dir, state) -> Accelerate's tracker, writing into the run folder, continuing on resume
    keys: dict = dataclasses.field(default_factory=dict)  # its config block, under its name: {key: spec.Key}
    meaning: str = ""  # what the block's keys mean when they say nothing themselves
    check: Callable = lambda cfg: None  # before any run folder is made: raise UserError for what would fail later
    group: str = ""  # the key of its block that groups runs: a sweep or a search sets it to its folder's name


def _tensorboard(cfg, run_dir, state):
    """<run>/tensorboard; on resume it drops its events after the checkpoint's step."""
    from accelerate.tracking import TensorBoardTracker

    purge = {"purge_step": state.step + 1} if state.step else {}
    return TensorBoardTracker("tensorboard", run_dir, **purge)


def _wandb(cfg, run_dir, state):
    """The wandb run named after the run folder; a resume continues it (its id is in the checkpoint)."""
    from accelerate.tracking import WandBTracker

    state.tracker_ids.setdefault("wandb", uuid.uuid4().hex[:12])
    w = cfg.wandb
    # A key left empty is left to wandb, which reads its WANDB_* variable (entity, group), or given
    # the variable's value here, where the toolkit has a default of its own.
    return WandBTracker(
        w.project or os.environ.get("WANDB_PROJECT") or "minloop", name=run_dir.name,
        id=state.tracker_ids["wandb"], resume="allow", dir=w.dir or os.environ.get("WANDB_DIR") or str(run_dir),
        mode=wandb_mode(cfg), entity=w.entity or None, group=w.group or None,
        config={k: str(v) if isinstance(v, list) else v for k, v in cfg.flat().items()})


def wandb_mode(cfg):
    """wandb.mode, else $WANDB_MODE, else online."""
    return cfg.wandb.mode or os.environ.get("WANDB_MODE") or "online"


def _check_wandb(cfg):
    """wandb online needs credentials (wandb would otherwise fail after the run started, with a traceback)."""
    if wandb_mode(cfg) != "online" or _wandb_credentials():
        return
    raise UserError("trackers has wandb in online mode, but no wandb credentials were found: run `wandb login`, "
                    "set WANDB_API_KEY, or use wandb.mode=offline (or WANDB_MODE=offline) to log without an account")


def _mlflow(cfg, run_dir, state):
    """An MLflow run named after the run folder, in the experiment mlflow.experiment; a resume
    continues it (its id, which MLflow gives when the run starts, is kept in the checkpoint). The
    config goes in as the run's parameters once, when it starts: MLflow refuses to change one."""
    from accelerate.tracking import MLflowTracker
    from accelerate import PartialState

    m = cfg.mlflow

    class Run(MLflowTracker):
        def start(self):
            if not PartialState().is_main_process:
                return
            import mlflow

            if m.tracking_uri:
                mlflow.set_tracking_uri(m.tracking_uri)
            super().start()
            if "mlflow" not in state.tracker_ids:
                self.store_init_configuration({k: str(v) if isinstance(v, list) else v for k, v in cfg.flat().items()})
            state.tracker_ids["mlflow"] = self.active_run.info.run_id

    return Run(experiment_name=m.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "minloop",
               run_id=state.tracker_ids.get("mlflow"), run_name=run_dir.name)


def _check_mlflow(cfg):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError("trackers has mlflow, which is not installed: pip install -e '.[mlflow]'") from None


# Every tracker of `trackers=[...]`; toolkit/keys.py gives each block its place among the keys.
TRACKERS = {
    "tensorboard": Tracker(_tensorboard),
    "wandb": Tracker(_wandb, {
        "project": Key("", 'the wandb project ("": $WANDB_PROJECT, else minloop); runs are named after their folder'),
        "entity": Key("", 'team or user ("": $WANDB_ENTITY, else yours); the key: `wandb login` or $WANDB_API_KEY'),
        "mode": Key("", 'offline needs no account ("": $WANDB_MODE, else online)',
                    choices=("", "online", "offline", "disabled")),
        "dir": Key("", 'wandb writes into <dir>/wandb ("": $WANDB_DIR, else the run folder)'),
        "group": Key("", 'e.g. a sweep\'s name ("": $WANDB_RUN_GROUP)'),
    }, meaning='"": what the WANDB_* variable says, else the default in brackets', check=_check_wandb, group="group"),
    "mlflow": Tracker(_mlflow, {
        "tracking_uri": Key("", 'a server (http://...), sqlite:///mlflow.db or file:<folder> ("": '
                                "$MLFLOW_TRACKING_URI, else MLflow's default)"),
        "experiment": Key("", 'the experiment ("": $MLFLOW_EXPERIMENT_NAME, else minloop; where set, the variable '
                              'wins); runs are named after their folder'),
    }, check=_check_mlflow),
}


def make_trackers(cfg, run_dir, state):
    """Accelerate's trackers for `cfg.trackers` (given to `Accelerator(log_with=...)`), each writing
    into the run folder and continuing on resume (a tracker's run id is kept in `state`)."""
    return [TRACKERS[name].make(cfg, run_dir, state) for name in cfg.trackers]


def check_trackers(cfg):
    """Before any run folder is made: what each tracker of the run needs (wandb online: credentials)."""
    for name in cfg.trackers:
        TRACKERS[name].check(cfg)


def group_overrides(cfg, name):
    """`key=value` overrides that group a sweep's or a search's runs under `name` in the trackers that
    group runs (wandb.group), where the config leaves the group unset."""
    return [f"{tracker}.{entry.group}={name}" for tracker, entry in TRACKERS.items()
            if entry.group and not cfg[tracker][entry.group]]


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
