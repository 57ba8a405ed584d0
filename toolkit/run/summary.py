"""The vocabulary of a run's end: why training stopped (`Stop`), how the run ended (`Status`), and
summary.json (`Summary`), which the run writes and sweeps, searches, `launch.py runs`, notifications
and the result line read. Plain Python: the sweep and search processes read summaries without torch."""

import dataclasses
import enum
import os
from pathlib import Path

from toolkit.run import rundir


class Status(str, enum.Enum):
    """How a run stands, as summary.json says it (a `str`, so that it compares with the text)."""

    RUNNING = "running"
    FINISHED = "finished"  # trained to its end (or a stop that finishes: max_steps, max_minutes, early_stop)
    PRUNED = "pruned"  # a search's pruner stopped it; it ended cleanly, untested
    INTERRUPTED = "interrupted"  # a signal stopped it after a save: `launch.py resume` continues it
    FAILED = "failed"  # an error, or too many non-finite steps
    HUNG = "hung"  # no progress for watchdog_minutes: each process's stacks are in hang-rank<r>.txt
    UNKNOWN = "unknown"  # no summary.json (a run that never started)

    @property
    def ended(self):
        """Whether the run ended by itself (an interrupted one continues on resume)."""
        return self in (Status.FINISHED, Status.PRUNED, Status.FAILED, Status.HUNG)

    def __str__(self):
        return self.value


class Stop(enum.Enum):
    """Why training stops before its last epoch. Every stop saves a checkpoint (nothing trained is
    lost); `finishes`: the run's end as its last epoch would be, with its final validation (mid-epoch
    too); `status`: what the summary says; `tests`: whether the test split is evaluated after it."""

    MAX_STEPS = "max_steps"
    MAX_MINUTES = "max_minutes"  # on every rank, when any rank's clock says so
    EARLY_STOP = "early_stop"
    PRUNED = "pruned"
    NAN = "nan"  # more than nan_tolerance non-finite steps in a row
    SIGTERM = "SIGTERM"
    SIGINT = "SIGINT"

    @property
    def finishes(self):
        return self in (Stop.MAX_STEPS, Stop.MAX_MINUTES)

    @property
    def status(self):
        return {Stop.PRUNED: Status.PRUNED, Stop.NAN: Status.FAILED, Stop.SIGTERM: Status.INTERRUPTED,
                Stop.SIGINT: Status.INTERRUPTED}.get(self, Status.FINISHED)

    @property
    def tests(self):
        return self.status == Status.FINISHED

    def __str__(self):
        return self.value


SPLITS = ("val", "val_ema", "test")  # the evaluations a summary holds, each as a top-level key of summary.json


@dataclasses.dataclass
class Summary:
    """summary.json: written when the run starts (running), at its end, and read by everything that
    looks at runs. `metrics` holds the last evaluation of each split (val, val_ema, test); in the
    JSON each is a key of its own. Fields left empty are not written."""

    status: Status = Status.RUNNING
    recipe: str = ""
    run_dir: str = ""
    epochs: int = 0  # completed epochs
    steps: int = 0  # optimizer steps
    host: str = ""  # where the run's main process runs, and its pid (to tell a running run from a dead one)
    pid: int = 0
    wall_time_s: float | None = None  # training time over all sessions
    error: str = ""  # why it failed
    signal: str = ""  # the signal that interrupted it
    best: dict | None = None  # {"monitor": "val/accuracy", "value": 0.91, "checkpoint": "step-..."}
    metrics: dict = dataclasses.field(default_factory=dict)  # split -> its metrics

    @property
    def best_value(self):
        return (self.best or {}).get("value")

    def to_json(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "metrics"}
        fields["status"] = str(self.status)
        return {**{k: v for k, v in fields.items() if v not in (None, "")}, **self.metrics}

    @classmethod
    def from_json(cls, values):
        names = {f.name for f in dataclasses.fields(cls)} - {"metrics"}
        known = {k: v for k, v in values.items() if k in names}
        try:
            known["status"] = Status(values.get("status", "unknown"))
        except ValueError:  # a status this version does not know
            known["status"] = Status.UNKNOWN
        return cls(**known, metrics={split: values[split] for split in SPLITS if split in values})

    @classmethod
    def read(cls, run_dir):
        """The summary of the run in `run_dir`; status UNKNOWN when it has none (or it is unreadable)."""
        return cls.from_json(rundir.read_json(Path(run_dir) / "summary.json") or {"status": "unknown"})

    def write(self, run_dir):
        rundir.write_json(Path(run_dir) / "summary.json", self.to_json())


def alive(pid):
    """Whether process `pid` of this machine is running (a summary's, a search process's)."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
