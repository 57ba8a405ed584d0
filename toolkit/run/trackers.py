"""Accelerate's trackers for `trackers=[...]`, each one entry of TRACKERS: tensorboard (Accelerate's
own), and wandb, mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio on `BaseTracker`, which
starts a run on the main process only, named after the run folder, and continues it on resume (its
id is kept in the checkpoint's `tracker_ids`) where the tracker can. A tracker writes its local files
into the run folder where it has any. `toolkit.run.metrics_log.Metrics` logs to them.
"""

import dataclasses
import importlib.util
import netrc
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from accelerate.tracking import GeneralTracker

from toolkit import UserError


@dataclasses.dataclass(frozen=True)
class Tracker:
    """One name of `trackers=[...]`: how to make it, and what it needs."""
    make: Callable  # (cfg, run_dir, state) -> Accelerate's tracker, writing into the run folder, continuing on resume
    check: Callable = lambda cfg: None  # before any run folder is made: raise UserError for what would fail later
    group: str = ""  # the key of its block that groups runs: a sweep or a search sets it to its folder's name
    module: str = ""  # the module it imports, where that is not a core dependency
    extra: str = ""  # the extra of setup.cfg that installs it


def _main_process():
    from accelerate import PartialState

    return PartialState().is_main_process


class BaseTracker(GeneralTracker):
    """What the trackers share, as torchtune's MetricLoggerInterface: the run begins on the main
    process only (elsewhere `run` stays None, and nothing is logged or finished), and the id that
    continues it on resume is kept in `state.tracker_ids[name]`. A tracker says the rest:

        begin(resume) -> (run, id)  start its run, named after the run folder, with the config (`params`),
                                    or continue the one `resume` names; `id`: what to keep (None: nothing)
        write(values, step)         log one window (by default `run.log(values, step=step)`)
        end()                       finish the run (by default `run.finish()`)
    """

    requires_logging_directory = False  # its config block says where it writes (the run folder by default)
    main_process_only = True
    tracker = property(lambda self: self.run)  # what `begin` gave

    def __init__(self, cfg, run_dir, state):
        super().__init__()
        self.cfg, self.run_dir, self.state, self.run = cfg, run_dir, state, None

    @property
    def params(self):
        """The config as a tracker's parameters: dotted keys, lists as text."""
        return {k: str(v) if isinstance(v, list) else v for k, v in self.cfg.flat().items()}

    def start(self):
        if _main_process():
            self.run, kept = self.begin(self.state.tracker_ids.get(self.name))
            if kept is not None:
                self.state.tracker_ids[self.name] = kept

    def store_init_configuration(self, values):
        """Nothing: the config goes in as the run begins (`params`)."""

    def log(self, values, step=None, **kwargs):
        if self.run is not None:
            self.write(values, step)

    def finish(self):
        if self.run is not None:
            self.end()
            self.run = None

    def begin(self, resume):
        raise NotImplementedError

    def write(self, values, step):
        self.run.log(values, step=step)

    def end(self):
        self.run.finish()


def _project(value, variable):
    """The config's value, else $variable, else minloop."""
    return value or os.environ.get(variable) or "minloop"


def _tensorboard(cfg, run_dir, state):
    """<run>/tensorboard; on resume it drops its events after the checkpoint's step."""
    from accelerate.tracking import TensorBoardTracker

    purge = {"purge_step": state.step + 1} if state.step else {}
    return TensorBoardTracker("tensorboard", run_dir, **purge)


class _WandB(BaseTracker):
    """The wandb run named after the run folder; a resume continues it (its id is in the checkpoint).
    A key left empty is left to wandb, which reads its WANDB_* variable (entity, group), or given
    the variable's value here, where the toolkit has a default of its own."""
    name = "wandb"

    def begin(self, resume):
        import wandb

        w, run_id = self.cfg.wandb, resume or uuid.uuid4().hex[:12]
        return wandb.init(
            project=_project(w.project, "WANDB_PROJECT"), name=self.run_dir.name, id=run_id, resume="allow",
            dir=w.dir or os.environ.get("WANDB_DIR") or str(self.run_dir), mode=wandb_mode(self.cfg),
            entity=w.entity or None, group=w.group or None, config=self.params), run_id


def wandb_mode(cfg):
    """wandb.mode, else $WANDB_MODE, else online."""
    return cfg.wandb.mode or os.environ.get("WANDB_MODE") or "online"


def _check_wandb(cfg):
    """wandb online needs credentials (wandb would otherwise fail after the run started, with a traceback)."""
    if wandb_mode(cfg) != "online" or _wandb_credentials():
        return
    raise UserError("trackers has wandb in online mode, but no wandb credentials were found: run `wandb login`, "
                    "set WANDB_API_KEY, or use wandb.mode=offline (or WANDB_MODE=offline) to log without an account")


class _MLflow(BaseTracker):
    """An MLflow run named after the run folder, in the experiment mlflow.experiment; a resume
    continues it (its id, which MLflow gives when the run starts, is kept in the checkpoint). The
    config goes in as the run's parameters once, when it starts: MLflow refuses to change one.
    Accelerate's MLflowTracker starts, logs and ends it."""
    name = "mlflow"

    def begin(self, resume):
        import mlflow
        from accelerate.tracking import MLflowTracker

        m = self.cfg.mlflow
        if m.tracking_uri:
            mlflow.set_tracking_uri(m.tracking_uri)
        run = MLflowTracker(experiment_name=_project(m.experiment, "MLFLOW_EXPERIMENT_NAME"), run_id=resume,
                            run_name=self.run_dir.name)
        run.start()
        if resume is None:
            run.store_init_configuration(self.params)
        return run, run.active_run.info.run_id


class _Aim(BaseTracker):
    """An Aim run named after the run folder, in the repo aim.repo (by default output_dir, so that
    `aim up --repo runs` shows every run); a resume continues it (its hash is in the checkpoint),
    also after a crash that left it locked."""
    name = "aim"

    def begin(self, resume):
        import aim
        from aim.sdk.errors import RunLockingError

        where = {"repo": self.cfg.aim.repo or self.cfg.output_dir, "experiment": self.cfg.aim.experiment}
        try:
            run = aim.Run(resume, **where)
        except RunLockingError:  # the run that crashed holds it still
            run = aim.Run(resume, **where, force_resume=True)
        run.name = self.run_dir.name
        run["hparams"] = self.params
        return run, run.hash

    def write(self, values, step):
        for key, value in values.items():
            self.run.track(value, name=key, step=step)

    def end(self):
        self.run.close()


class _CometML(BaseTracker):
    """A Comet experiment named after the run folder, whose key the toolkit chooses and keeps in the
    checkpoint, so that a resume continues it. Offline, its archive goes into <run>/comet_ml."""
    name = "comet_ml"

    def begin(self, resume):
        import comet_ml

        c, key = self.cfg.comet_ml, resume or uuid.uuid4().hex  # 32 characters, as Comet asks
        run = comet_ml.start(
            project_name=_project(c.project, "COMET_PROJECT_NAME"), workspace=c.workspace or None,
            experiment_key=key, mode="get_or_create",
            online={"online": True, "offline": False}.get(c.mode),  # None: $COMET_START_ONLINE, else online
            experiment_config=comet_ml.ExperimentConfig(
                name=self.run_dir.name,
                offline_directory=os.environ.get("COMET_OFFLINE_DIRECTORY") or str(self.run_dir / "comet_ml")))
        run.log_parameters(self.params)
        return run, key

    def write(self, values, step):
        self.run.set_step(step)
        for key, value in values.items():
            self.run.log_metric(key, value, step=step)

    def end(self):
        self.run.end()


class _ClearML(BaseTracker):
    """A ClearML task named after the run folder (or $CLEARML_TASK), with the config as its
    hyperparameters; a resume continues it (its id is in the checkpoint). The toolkit logs the
    metrics itself, so ClearML does not also capture tensorboard's, nor register every torch.save of
    a checkpoint as a model."""
    name = "clearml"

    def begin(self, resume):
        from clearml import Task

        task = Task.init(
            project_name=_project(self.cfg.clearml.project, "CLEARML_PROJECT"),
            task_name=os.environ.get("CLEARML_TASK") or self.run_dir.name, reuse_last_task_id=False,
            continue_last_task=resume or False, auto_connect_arg_parser=False,
            auto_connect_frameworks={"tensorboard": False, "pytorch": False})
        task.connect(self.params, name="config")
        return task, task.id

    def write(self, values, step):  # as Accelerate's ClearMLTracker reports split/name keys: numbers, series "train"
        scalars = self.run.get_logger()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                scalars.report_scalar(title=key, series="train", value=value, iteration=step)

    def end(self):
        self.run.close()


class _DVCLive(BaseTracker):
    """DVCLive's files in <run>/dvclive (or dvclive.dir); a resume continues them, first dropping
    the steps logged after the checkpoint, so that none appears twice."""
    name = "dvclive"

    def begin(self, resume):
        from dvclive import Live

        folder, step = Path(self.cfg.dvclive.dir or self.run_dir / "dvclive"), self.state.step
        if step:
            _drop_steps_after(folder / "plots" / "metrics", step)
        live = Live(dir=str(folder), resume=bool(step), dvcyaml=str(folder / "dvc.yaml"))
        live.log_params(self.params)
        return live, None  # its folder is the run

    def write(self, values, step):
        from dvclive.plots import Metric

        self.run.step = step
        for key, value in values.items():
            if Metric.could_log(value):
                self.run.log_metric(key, value)
        self.run.next_step()

    def end(self):
        self.run.end()


def _drop_steps_after(folder, step):
    """Cut DVCLive's metric files (<name>.tsv, with a step column) back to `step`."""
    for path in folder.rglob("*.tsv"):
        header, *rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
        column = header.rstrip("\n").split("\t").index("step")
        path.write_text(header + "".join(row for row in rows if int(row.split("\t")[column]) <= step),
                        encoding="utf-8")


class _SwanLab(BaseTracker):
    """A SwanLab experiment named after the run folder, with an id the toolkit chooses and keeps in
    the checkpoint, so that a resume continues it; local files in <run>/swanlog (or $SWANLAB_LOG_DIR)."""
    name = "swanlab"

    def begin(self, resume):
        import swanlab

        s, run_id = self.cfg.swanlab, resume or uuid.uuid4().hex[:21]
        return swanlab.init(
            project=_project(s.project, "SWANLAB_PROJ_NAME"), workspace=s.workspace or None,
            name=self.run_dir.name, group=s.group or None, mode=s.mode or None, id=run_id, resume="allow",
            log_dir=os.environ.get("SWANLAB_LOG_DIR") or str(self.run_dir / "swanlog"), config=self.params), run_id


class _Trackio(BaseTracker):
    """A Trackio run named after the run folder, in trackio.project, stored where Trackio stores
    them ($TRACKIO_DIR) or in a Space (trackio.space_id, else $TRACKIO_SPACE_ID); a resume continues
    it by its name."""
    name = "trackio"

    def begin(self, resume):
        import trackio

        t = self.cfg.trackio
        run = trackio.init(project=t.project, name=resume or self.run_dir.name, group=t.group or None,
                           space_id=t.space_id or None, config=self.params,
                           resume="never" if resume is None else "allow")
        return run, run.name


# Every tracker of `trackers=[...]`; its config block (wandb.*) is declared in toolkit/config/keys.py.
TRACKERS = {
    "tensorboard": Tracker(_tensorboard),
    "wandb": Tracker(_WandB, check=_check_wandb, group="group"),
    "mlflow": Tracker(_MLflow, module="mlflow", extra="mlflow"),
    "aim": Tracker(_Aim, module="aim", extra="aim"),
    "comet_ml": Tracker(_CometML, module="comet_ml", extra="comet"),
    "clearml": Tracker(_ClearML, module="clearml", extra="clearml"),
    "dvclive": Tracker(_DVCLive, module="dvclive", extra="dvclive"),
    "swanlab": Tracker(_SwanLab, group="group", module="swanlab", extra="swanlab"),
    "trackio": Tracker(_Trackio, group="group", module="trackio", extra="trackio"),
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
