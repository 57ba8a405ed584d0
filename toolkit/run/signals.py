"""Stopping cleanly on SIGTERM or Ctrl-C, with every rank stopping at the same step."""

import signal

import torch
import torch.distributed as dist

from toolkit.run.summary import Stop


class StopRequest:
    """`check()` once per training step on every rank; it returns the agreed `Stop` (a signal, or
    max_minutes) once a stop is agreed. The first SIGTERM or SIGINT asks for a stop at the next step
    boundary (the loop then saves a checkpoint); a second Ctrl-C aborts at once.

    With several processes the ranks must agree on the step, or one would wait in a collective the
    others never reach. They agree through an all-reduce of the flag on a CPU (gloo) group, started
    at one step and read at the next, so the accelerator never waits for it.
    """

    def __init__(self, num_processes):
        self.requested = None
        self.group = dist.new_group(backend="gloo") if num_processes > 1 else None
        self.flag = torch.zeros(1)
        self.pending = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        self.requested = self.requested or signal.Signals(signum).name

    def check(self, over_time=False):
        """The agreed `Stop`, or None. `over_time`: this rank's clock says max_minutes have passed;
        ranks whose clocks disagree must still stop at the same step, for the same reason (a stop
        for max_minutes validates, a signal's does not: every rank must do the same)."""
        reasons = (None, Stop.MAX_MINUTES, Stop[self.requested or "SIGTERM"])
        mine = 2 if self.requested else 1 if over_time else 0
        if self.group is None:
            return reasons[mine]
        agreed = None
        if self.pending is not None:
            self.pending.wait()
            agreed = reasons[int(self.flag.item())]  # the strongest reason of any rank
        self.flag.fill_(mine)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        """Training ended: normally, wait for the last all-reduce (every rank gets here); either way,
        give the signals back."""
        if error is None:
            self.finish()
        self.close()

    def finish(self):
        """Wait for the last all-reduce (every rank calls this when training ends normally)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def close(self):
        """Give the signals back to their previous handlers."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
