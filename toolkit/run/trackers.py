"""Experiment tracking: metrics.jsonl and Accelerate's trackers (TRACKERS: tensorboard, wandb,
mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio).

Every logged train window and evaluation goes to both through `Metrics.log`, on the main process:
one JSON object per line in <run>/metrics.jsonl, and the same numbers to each tracker. Each tracker
is one entry of TRACKERS: its config block, and a subclass of Accelerate's tracker that starts on
the main process only, names its run after the run folder, writes its local files into the run
folder where it has any, and continues the same run on resume (its id is kept in the checkpoint's
`tracker_ids`) where the tracker can.
"""

import dataclasses
import importlib.util
import json
import netrc
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from toolkit import UserError


@dataclasses.dataclass(frozen=True)
class Tracker:
    """One name of `trackers=[...]`: how to make it, and what it needs."""
    make: Callable  # (cfg, run_dir, state) -> Accelerate's tracker, writing into the run folder, continuing on resume
    check: Callable = lambda cfg: None  # before any run folder is made: raise UserError for what would fail later
    group: str = ""  # the key of its block that groups runs: a sweep or a search sets it to its folder's name
    module: str = ""  # the module it imports, where that is not a core dependency
    extra: str = ""  # the extra of setup.cfg that installs it


def _params(cfg):
    """The config as a tracker's parameters: dotted keys, lists as text."""
    return {k: str(v) if isinstance(v, list) else v for k, v in cfg.flat().items()}


def _main_process():
    from accelerate import PartialState

    return PartialState().is_main_process


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
        config=_params(cfg))


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

    m = cfg.mlflow

    class Run(MLflowTracker):
        def start(self):
            if not _main_process():
                return
            import mlflow

            if m.tracking_uri:
                mlflow.set_tracking_uri(m.tracking_uri)
            super().start()
            if "mlflow" not in state.tracker_ids:
                self.store_init_configuration(_params(cfg))
            state.tracker_ids["mlflow"] = self.active_run.info.run_id

    return Run(experiment_name=m.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "minloop",
               run_id=state.tracker_ids.get("mlflow"), run_name=run_dir.name)


def _aim(cfg, run_dir, state):
    """An Aim run named after the run folder, in the repo aim.repo (by default output_dir, so that
    `aim up --repo runs` shows every run); a resume continues it (its hash is in the checkpoint),
    also after a crash that left it locked."""
    from accelerate.tracking import AimTracker

    a = cfg.aim

    class Run(AimTracker):
        def start(self):
            if not _main_process():
                return
            from aim import Run
            from aim.sdk.errors import RunLockingError

            try:
                self.writer = Run(state.tracker_ids.get("aim"), repo=self.aim_repo_path, experiment=a.experiment)
            except RunLockingError:  # the run that crashed holds it still
                self.writer = Run(state.tracker_ids["aim"], repo=self.aim_repo_path, experiment=a.experiment,
                                  force_resume=True)
            self.writer.name = run_dir.name
            self.writer["hparams"] = _params(cfg)
            state.tracker_ids["aim"] = self.writer.hash

    return Run(run_dir.name, a.repo or cfg.output_dir)


def _comet_ml(cfg, run_dir, state):
    """A Comet experiment named after the run folder, whose key the toolkit chooses and keeps in the
    checkpoint, so that a resume continues it. Offline, its archive goes into <run>/comet_ml."""
    from accelerate.tracking import CometMLTracker

    c = cfg.comet_ml
    key = state.tracker_ids.setdefault("comet_ml", uuid.uuid4().hex)  # 32 characters, as Comet asks

    class Run(CometMLTracker):
        def start(self):
            if not _main_process():
                return
            import comet_ml

            self.writer = comet_ml.start(
                project_name=c.project or os.environ.get("COMET_PROJECT_NAME") or "minloop",
                workspace=c.workspace or None, experiment_key=key, mode="get_or_create",
                online={"online": True, "offline": False}.get(c.mode),  # None: $COMET_START_ONLINE, else online
                experiment_config=comet_ml.ExperimentConfig(
                    name=run_dir.name, offline_directory=os.environ.get("COMET_OFFLINE_DIRECTORY") or str(
                        run_dir / "comet_ml")))
            self.writer.log_parameters(_params(cfg))

    return Run(run_dir.name)


def _clearml(cfg, run_dir, state):
    """A ClearML task named after the run folder (or $CLEARML_TASK), with the config as its
    hyperparameters; a resume continues it (its id is in the checkpoint). The toolkit logs the
    metrics itself, so ClearML does not also capture tensorboard's, nor register every torch.save of
    a checkpoint as a model."""
    from accelerate.tracking import ClearMLTracker

    c = cfg.clearml

    class Run(ClearMLTracker):
        def start(self):
            if not _main_process():
                return
            from clearml import Task

            self.task = Task.init(
                project_name=c.project or os.environ.get("CLEARML_PROJECT") or "minloop",
                task_name=os.environ.get("CLEARML_TASK") or run_dir.name, reuse_last_task_id=False,
                continue_last_task=state.tracker_ids.get("clearml", False), auto_connect_arg_parser=False,
                auto_connect_frameworks={"tensorboard": False, "pytorch": False})
            self.task.connect(_params(cfg), name="config")
            state.tracker_ids["clearml"] = self.task.id

    return Run(run_dir.name)


def _dvclive(cfg, run_dir, state):
    """DVCLive's files in <run>/dvclive (or dvclive.dir); a resume continues them, first dropping
    the steps logged after the checkpoint, so that none appears twice."""
    from accelerate.tracking import DVCLiveTracker

    folder = Path(cfg.dvclive.dir or run_dir / "dvclive")

    class Run(DVCLiveTracker):
        def start(self):
            if not _main_process():
                return
            from dvclive import Live

            if state.step:
                _drop_steps_after(folder / "plots" / "metrics", state.step)
            self.live = Live(dir=str(folder), resume=bool(state.step), dvcyaml=str(folder / "dvc.yaml"))
            self.live.log_params(_params(cfg))

    return Run(run_dir.name)


def _drop_steps_after(folder, step):
    """Cut DVCLive's metric files (<name>.tsv, with a step column) back to `step`."""
    for path in folder.rglob("*.tsv"):
        header, *rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
        column = header.rstrip("\n").split("\t").index("step")
        path.write_text(header + "".join(row for row in rows if int(row.split("\t")[column]) <= step),
                        encoding="utf-8")


def _swanlab(cfg, run_dir, state):
    """A SwanLab experiment named after the run folder, with an id the toolkit chooses and keeps in
    the checkpoint, so that a resume continues it; local files in <run>/swanlog (or $SWANLAB_LOG_DIR).
    Accelerate would start it on every process: here only the main one does."""
    from accelerate.tracking import SwanLabTracker

    s = cfg.swanlab
    run_id = state.tracker_ids.setdefault("swanlab", uuid.uuid4().hex[:21])

    class Run(SwanLabTracker):
        main_process_only = True  # its log and finish too

        def start(self):
            if not _main_process():
                return
            import swanlab

            self.run = swanlab.init(
                project=s.project or os.environ.get("SWANLAB_PROJ_NAME") or "minloop", workspace=s.workspace or None,
                name=run_dir.name, group=s.group or None, mode=s.mode or None, id=run_id, resume="allow",
                log_dir=os.environ.get("SWANLAB_LOG_DIR") or str(run_dir / "swanlog"), config=_params(cfg))

    return Run(run_dir.name)


def _trackio(cfg, run_dir, state):
    """A Trackio run named after the run folder, in trackio.project, stored where Trackio stores
    them ($TRACKIO_DIR) or in a Space (trackio.space_id, else $TRACKIO_SPACE_ID); a resume continues
    it by its name. Accelerate would start it on every process: here only the main one does."""
    from accelerate.tracking import TrackioTracker

    t = cfg.trackio

    class Run(TrackioTracker):
        main_process_only = True  # its log and finish too

        def start(self):
            if not _main_process():
                return
            import trackio

            resuming = "trackio" in state.tracker_ids
            self.run = trackio.init(project=t.project, name=state.tracker_ids.get("trackio", run_dir.name),
                                    group=t.group or None, space_id=t.space_id or None, config=_params(cfg),
                                    resume="allow" if resuming else "never")
            state.tracker_ids["trackio"] = self.run.name

    return Run(run_dir.name)


# Every tracker of `trackers=[...]`; its config block (wandb.*) is declared in toolkit/config/keys.py.
TRACKERS = {
    "tensorboard": Tracker(_tensorboard),
    "wandb": Tracker(_wandb, check=_check_wandb, group="group"),
    "mlflow": Tracker(_mlflow, module="mlflow", extra="mlflow"),
    "aim": Tracker(_aim, module="aim", extra="aim"),
    "comet_ml": Tracker(_comet_ml, module="comet_ml", extra="comet"),
    "clearml": Tracker(_clearml, module="clearml", extra="clearml"),
    "dvclive": Tracker(_dvclive, module="dvclive", extra="dvclive"),
    "swanlab": Tracker(_swanlab, group="group", module="swanlab", extra="swanlab"),
    "trackio": Tracker(_trackio, group="group", module="trackio", extra="trackio"),
}


def make_trackers(cfg, run_dir, state):
    """Accelerate's trackers for `cfg.trackers` (given to `Accelerator(log_with=...)`), each writing
    into the run folder and continuing on resume (a tracker's run id is kept in `state`)."""
    return [TRACKERS[name].make(cfg, run_dir, state) for name in cfg.trackers]


def check_trackers(cfg):
    """Before any run folder is made: what each tracker of the run needs (installed; wandb online:
    credentials)."""
    for name in cfg.trackers:
        entry = TRACKERS[name]
        if entry.module and not _installed(entry.module):
            raise UserError(f"trackers has {name}, which is not installed: pip install -e '.[{entry.extra}]'")
        entry.check(cfg)


def _installed(module):
    if module in sys.modules:
        return sys.modules[module] is not None  # None: an import of it fails
    return importlib.util.find_spec(module) is not None


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
    """metrics.jsonl plus Accelerate's trackers (TRACKERS): one call logs to all; as a
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
