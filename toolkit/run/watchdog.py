"""watchdog_minutes: a run whose process makes no progress (no optimizer step, no evaluation batch,
no checkpoint) for that long is hung, not slow, and says where it hangs.

Each process watches itself from a thread of its own. When it fires, the process writes the stacks of
all its threads (`faulthandler`) to <run>/hang-rank<r>.txt and waits a few seconds for the others'
(a rank that waits for a hung one in a collective is stuck as long, so its watchdog fires about as
soon); the main process records the run as `hung` in summary.json, with the step and the ranks that
wrote their stacks, and every process exits with status 1, so that the launcher ends the rest. A
process whose collective breaks because a hung one exited records the same (`toolkit.run.records`).

The process group's own timeout (NCCL's 10 minutes by default, gloo's 30) ends a collective that
waits too long, but without a word of where each rank was in Python. Keep watchdog_minutes below it
to get the stacks; above the longest step, evaluation batch or checkpoint save of the run (a first
step under torch.compile can take minutes).
"""

import faulthandler
import os
import sys
import threading
import time

from toolkit.run.logs import log
from toolkit.run.summary import Status

GRACE_S = 10  # how long the main process waits for the other processes' stacks


class Watchdog:
    """`beat()` at every sign of progress; `with watchdog:` watches between them (minutes=0: never)."""

    def __init__(self, minutes, run, rank, world):
        self.limit, self.run, self.rank, self.world = 60 * minutes, run, rank, world
        self.last = time.monotonic()
        self.done = threading.Event()

    def beat(self):
        self.last = time.monotonic()

    def __enter__(self):
        if self.limit:
            self.beat()
            threading.Thread(target=self._watch, name="minloop-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()

    def _watch(self):
        while not self.done.wait(min(self.limit / 10, 5)):
            if time.monotonic() - self.last > self.limit:
                self._fire()

    def _fire(self):
        """Write this process's stacks; on the main process, record the hang; end the process."""
        folder, step, minutes = self.run.dir, self.run.state.step, self.limit / 60
        with open(folder / f"hang-rank{self.rank}.txt", "w", encoding="utf-8") as f:
            f.write(f"rank {self.rank}: no step, evaluation batch or save for {minutes:g} minutes after step "
                    f"{step}; the stacks of its threads:\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        deadline = time.monotonic() + GRACE_S
        while len(reported(folder)) < self.world and time.monotonic() < deadline:
            time.sleep(0.1)  # the other processes' watchdogs fire about now: wait for their stacks
        if self.rank == 0:
            record(self.run.summary, folder, step, minutes)
            self.run.summary.write(folder)
            log.error(f"hung: {self.run.summary.error}")
        print(f"error: rank {self.rank} hung: no progress for {minutes:g} minutes after step {step}; its stacks: "
              f"{folder / f'hang-rank{self.rank}.txt'}", file=sys.stderr, flush=True)
        os._exit(1)  # the stuck main thread cannot unwind: end the process, and the launcher the others


def reported(run_dir):
    """The ranks that wrote their stacks into `run_dir` (hang-rank<r>.txt)."""
    return sorted(int(p.stem.removeprefix("hang-rank")) for p in run_dir.glob("hang-rank*.txt"))


def record(summary, run_dir, step, minutes):
    """Say in `summary` that the run in `run_dir` hung after `step`, and which ranks wrote their stacks."""
    summary.status, summary.steps = Status.HUNG, step
    summary.error = (f"no progress for {minutes:g} minutes after step {step}; the stacks of ranks "
                     f"{', '.join(map(str, reported(run_dir)))} are in {run_dir}/hang-rank<r>.txt")
