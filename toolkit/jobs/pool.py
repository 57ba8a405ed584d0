"""Several `launch.py` processes at once (`sweep --parallel K`, `search --parallel K`), each on its
own GPUs or, without GPUs, its own share of the CPU cores.

With GPUs, each of the K runs sees GPUs/K of them through CUDA_VISIBLE_DEVICES (a launcher such as
`accelerate launch --num_processes 2` then uses what its run sees). Without GPUs, each run gets
cores/K cores: it is pinned to them and OMP_NUM_THREADS says how many, so that K runs do not fight
over every core.

Without GPUs and without a launcher, a run is not a fresh interpreter but a fork of one that has
imported torch, accelerate and the toolkit already (multiprocessing's forkserver: a clean process,
started once, that has no thread and no CUDA context when it forks). A run of a few seconds then
skips the interpreter's start and those imports, most of its time. With GPUs, or a launcher, each
run is a process of its own, as `python launch.py` would start it.

The processes of one run on CPUs can be forked so too (`forked_ranks`, with the variables torch's
launcher gives them): `check` counts the samples of 2 processes that way.
"""

import atexit
import ctypes
import logging
import multiprocessing
import os
import runpy
import signal
import socket
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
        self.running = {}  # Popen or Forked -> (key, slot)
        self.output_dir = output_dir
        self.can_fork = not gpus()
        # Runs still going when this process exits get SIGTERM (they save and stop), as `_die_with`
        # does for fresh ones: multiprocessing would wait for its forked ones to finish instead.
        atexit.register(self.stop)

    def start(self, key, command, env=None, cwd=None, name=None, fork=False):
        """Start `command` in a free slot; `wait` will return it under `key`. Returns the slot's label.
        With `fork`, `command` is `[sys.executable, SCRIPT, ...]`, run forked from a pre-imported
        interpreter where this machine has no GPU (`forked`)."""
        slot = self.free.pop(0)
        extra, cores, _ = slot
        output = Path(self.output_dir) / f"{name or key}.txt" if self.output_dir is not None else None
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(env or {}), **extra}
        if fork and self.can_fork:
            process = forked(command[1:], env, cwd, cores, output)
        else:
            process = _popen(command, env, cwd, cores, output)
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


def _popen(command, env, cwd, cores, output):
    parent = os.getpid()

    def prepare():  # runs in the child, before launch.py starts (this process starts no threads)
        if cores:
            os.sched_setaffinity(0, cores)
        _die_with(parent)

    log = open(output, "a", encoding="utf-8") if output else None
    try:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                                preexec_fn=prepare, cwd=cwd)
    finally:
        if log:
            log.close()  # the child has its own copy


# What every run imports: the forkserver imports it once, before it forks any run.
PRELOAD = ["torch", "torch._dynamo", "accelerate", "toolkit.loop", "toolkit.state.checkpoint",
           "toolkit.run.metrics_log"]


class Forked:
    """`python SCRIPT ARGS` run in a process forked from the pre-imported forkserver, seen as a
    Popen is (`poll`, `send_signal`, `pid`)."""

    def __init__(self, process):
        self.process = process
        self.pid = process.pid

    def poll(self):
        return None if self.process.is_alive() else self.process.exitcode

    def send_signal(self, sig):
        if self.process.is_alive():
            os.kill(self.pid, sig)


def forked(argv, env, cwd=None, cores=None, output=None):
    """Run the script `argv[0]` with `argv` as sys.argv, as `python` would, in a fork of the
    forkserver, with environment `env`, in `cwd`, pinned to `cores`, its output into the file
    `output`, or its stdout and stderr into the files of an `(out, err)` pair (else this process's).
    Returns a `Forked`."""
    out, err = output if isinstance(output, (tuple, list)) else (output, output)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    files = [str(file) if file else None for file in (out, err)]
    process = context.Process(target=_run_script, args=(list(argv), dict(env), cwd, cores, files),
                              name=Path(argv[0]).name, daemon=False)
    process.start()
    return Forked(process)


def forked_ranks(argv, n, env, cwd=None, output=None, port=None):
    """The `n` processes of one run of the script `argv[0]` on this machine's CPUs, each `forked`
    with the variables torch's launcher gives its processes (RANK, LOCAL_RANK, WORLD_SIZE, ...;
    MASTER_PORT `port`, else a free one of 127.0.0.1): what `torchrun --standalone --nproc_per_node n`
    starts, without its launcher's process nor each process's imports. Wait for them with `wait_ranks`."""
    launched = {**env, "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free_port())}
    launched.setdefault("OMP_NUM_THREADS", "1")  # torch's launcher's, for several processes
    return [forked(argv, {**launched, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd, output=output)
            for rank in range(n)]


def wait_ranks(ranks, timeout=None):
    """0 when every rank of `forked_ranks` ends well, else 1: when the first fails, the others get
    SIGTERM, as torch's launcher sends it. After `timeout` seconds, all get SIGKILL and
    subprocess.TimeoutExpired is raised."""
    deadline = None if timeout is None else time.monotonic() + timeout
    failed = False
    while any(rank.poll() is None for rank in ranks):
        if not failed and any(rank.poll() not in (None, 0) for rank in ranks):
            failed = True
            for rank in ranks:
                rank.send_signal(signal.SIGTERM)
        if deadline is not None and time.monotonic() > deadline:
            for rank in ranks:
                rank.send_signal(signal.SIGKILL)
            raise subprocess.TimeoutExpired(["launch.py"], timeout)
        time.sleep(0.05)  # a poll interval
    return int(failed or any(rank.poll() != 0 for rank in ranks))


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_script(argv, env, cwd, cores, files):
    """In the forked process: become what `python ARGV` started in `cwd` with `env` would be."""
    _die_with(os.getppid())  # the forkserver, which ends with the process that started it
    # A process the forkserver starts takes its start method for its own children; `python SCRIPT`
    # has the platform's (fork on Linux), with which DataLoader workers get the recipe's data as it
    # is, where the forkserver's would have to import it by a module name that a recipe file lacks.
    multiprocessing.set_start_method(None, force=True)
    os.environ.clear()
    os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    if cores:
        os.sched_setaffinity(0, cores)
    if "OMP_NUM_THREADS" in env:  # torch read it when the forkserver imported it
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for stream, file in zip((1, 2), files):  # stdout's and stderr's file, or None to keep this process's
        if file:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, stream)
            os.close(fd)
    sys.argv = list(argv)
    sys.path[0] = str(Path(argv[0]).resolve().parent)  # as `python SCRIPT` sets it
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        logging.shutdown()  # what the interpreter's exit would do; a forked process skips atexit
        sys.stdout.flush()
        sys.stderr.flush()


_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None  # looked up before any fork


def _die_with(parent):
    """Ask Linux to send this process SIGTERM when the sweep or search that started it dies, even by
    SIGKILL: the run then saves a checkpoint and stops, and no run is left training unseen."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
