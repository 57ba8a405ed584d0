"""Several `launch.py` processes at once (`sweep --parallel K`, `search --parallel K`), each on its
own GPUs or, without GPUs, its own share of the CPU cores.

With GPUs, each of the K runs sees GPUs/K of them through CUDA_VISIBLE_DEVICES (a launcher such as
`accelerate launch --num_processes 2` then uses what its run sees). Without GPUs, each run gets
cores/K cores: it is pinned to them and OMP_NUM_THREADS says how many, so that K runs do not fight
over every core.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from toolkit import UserError


def gpus():
    """The GPUs this machine shows to its processes (their CUDA_VISIBLE_DEVICES entries); [] for none.

    Read from the driver's files rather than by starting CUDA: the sweep and search processes only
    start other processes and should not hold a GPU themselves."""
    found = Path("/proc/driver/nvidia/gpus")
    count = len(list(found.iterdir())) if found.is_dir() else 0
    if not count:
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            count = listed.stdout.count("GPU ") if listed.returncode == 0 else 0
        except (OSError, subprocess.TimeoutExpired):
            count = 0
    if not count:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(count)]


def slots(k):
    """What each of `k` concurrent runs gets: a list of (environment additions, CPU cores or None, label)."""
    if k < 1:
        raise UserError(f"--parallel {k}: must be 1 or more")
    devices = gpus()
    if devices:
        if k > len(devices):
            raise UserError(f"--parallel {k} needs {k} GPUs, one per run, but this machine shows {len(devices)} "
                            f"(CUDA_VISIBLE_DEVICES={','.join(devices)}); use --parallel {len(devices)} or fewer")
        share = len(devices) // k
        groups = [devices[i * share:(i + 1) * share] for i in range(k)]
        return [({"CUDA_VISIBLE_DEVICES": ",".join(g)}, None, f"GPU {','.join(g)}") for g in groups]
    if k == 1:
        return [({}, None, "all CPU cores")]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    if k > len(cores):
        print(f"warning: --parallel {k} runs share {len(cores)} CPU cores: one core each, several on the same core",
              file=sys.stderr)
        groups = [[cores[i % len(cores)]] for i in range(k)]
    else:
        share, extra = divmod(len(cores), k)
        starts = [i * share + min(i, extra) for i in range(k + 1)]
        groups = [cores[starts[i]:starts[i + 1]] for i in range(k)]
    return [({"OMP_NUM_THREADS": str(len(g))}, set(g), f"CPU {','.join(map(str, g))}") for g in groups]


class Pool:
    """Runs processes, at most one per slot; `start` while `free`, then `wait` for some to end."""

    def __init__(self, k, output_dir=None):
        """With `output_dir`, each process writes its console output into <output_dir>/<key>.txt
        instead of this terminal (K runs printing into one terminal would be unreadable)."""
        self.free = slots(k)
        self.running = {}  # Popen -> (key, slot)
        self.output_dir = output_dir

    def start(self, key, command, env=None, cwd=None, name=None):
        """Start `command` in a free slot; `wait` will return it under `key`. Returns the slot's label."""
        slot = self.free.pop(0)
        extra, cores, _ = slot
        output = None
        if self.output_dir is not None:
            Path(self.output_dir).mkdir(parents=True, exist_ok=True)
            output = open(Path(self.output_dir) / f"{name or key}.txt", "a", encoding="utf-8")

        parent = os.getpid()

        def prepare():  # runs in the child, before launch.py starts (this process starts no threads)
            if cores:
                os.sched_setaffinity(0, cores)
            _die_with(parent)

        process = subprocess.Popen(command, env={**os.environ, **(env or {}), **extra}, stdout=output,
                                   stderr=subprocess.STDOUT if output else None, preexec_fn=prepare, cwd=cwd)
        if output:
            output.close()  # the child has its own copy
        self.running[process] = (key, slot)
        return slot[2]

    def wait(self, timeout=None, stop=lambda: False):
        """[(key, exit status)] of the processes that ended: at least one, unless `timeout` seconds
        pass or `stop()` becomes true first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            ended = [(p, p.poll()) for p in list(self.running) if p.poll() is not None]
            if ended:
                done = []
                for process, code in ended:
                    key, slot = self.running.pop(process)
                    self.free.append(slot)
                    done.append((key, code))
                return done
            if stop() or (deadline is not None and time.monotonic() > deadline):
                return []
            time.sleep(0.1)
        return []

    def stop(self, sig=signal.SIGTERM):
        """Send `sig` to every run (each saves a checkpoint and exits) and wait for them all."""
        for process in self.running:
            if process.poll() is None:
                process.send_signal(sig)
        ended = []
        while self.running:
            ended += self.wait()
        return ended


_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None  # looked up before any fork


def _die_with(parent):
    """Ask Linux to send this process SIGTERM when the sweep or search that started it dies, even by
    SIGKILL: the run then saves a checkpoint and stops, and no run is left training unseen."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
