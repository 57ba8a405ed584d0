"""Shared test helpers: tiny MNIST-format data and running the real command line."""

import contextlib
import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from toolkit.jobs.pool import free_port  # noqa: F401 - the tests import it from here

REPO = Path(__file__).resolve().parents[1]
LENET = str(REPO / "recipes" / "lenet.py")
RESNET = str(REPO / "recipes" / "resnet_cifar.py")
PROBE = str(REPO / "tests" / "recipes" / "probe.py")  # records each rank's samples and draws
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CPU = {"ACCELERATE_USE_CPU": "1"}  # several processes on CPUs talk over gloo


def write_idx(path, tensor, compress=True):
    """Write a uint8 tensor as an IDX file (the MNIST format)."""
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
    data = header + tensor.to(torch.uint8).contiguous().numpy().tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def make_mnist(root, n_train=3000, n_test=1001, seed=0, compress=True):
    """A learnable stand-in for MNIST: each class is a bright bar at its own place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 90, (n, 28, 28), generator=g)
        for c in range(10):
            row, col = 3 + (c // 5) * 12, 2 + (c % 5) * 5
            images[labels == c, row:row + 10, col:col + 4] += 160
        suffix = ".gz" if compress else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images.clamp(0, 255), compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return root


def command(args, launcher=()):
    """The command line that runs `launch.py args` (through `launcher`, e.g. accelerate launch)."""
    return [*map(str, launcher or [sys.executable]), str(REPO / "launch.py"), *map(str, args)]


def environment(env=None):
    """This process's environment with `env` added; a variable given as None is removed."""
    merged = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return {key: value for key, value in merged.items() if value is not None}


def launch(args, cwd, launcher=(), env=None, timeout=300, fresh=False):
    """Run `launch.py args` as a user would; return a CompletedProcess (status, stdout, stderr).

    One process runs inside this one, as torchtune's recipe tests do: the same `main`, in `cwd`,
    with `env` added to the environment, sys.argv set, and its output captured, but without a new
    interpreter's 3 s of start-up (importing torch and accelerate). With `accelerate launch` as the
    `launcher`, its processes are forks of an interpreter that has imported them already, each
    with the environment that `accelerate launch` gives it (`accelerate_forks`). With `fresh` (a
    test of the processes themselves: signals, exit statuses, variables read when torch is
    imported), or another launcher (torchrun), they are new processes started by the launcher.
    So are `sweep` and `search`, whose runs are processes that write to their parent's own output.
    A hang becomes a failure after `timeout` seconds."""
    if launcher and not fresh and list(launcher[:3]) == accelerate_launch():
        forks = accelerate_forks(args, cwd, launcher[3:], env, timeout)
        if forks is not None:
            return forks
    if launcher or fresh or args[0] in ("sweep", "search"):
        return subprocess.run(command(args, launcher), cwd=cwd, env=environment(env), capture_output=True,
                              text=True, timeout=timeout)
    return in_this_process(args, cwd, env)


def accelerate_forks(args, cwd, launch_args, env=None, timeout=300):
    """`accelerate launch LAUNCH_ARGS launch.py ARGS` without the launcher's own process, nor the
    3 s each of its processes takes to import torch and accelerate: Accelerate's launch command
    runs in this process up to where it would start torch's launcher (its config file and flags
    read, the strategy's variables set), and the processes are forks of the forkserver that
    `toolkit.jobs.pool` starts a sweep's runs from, each with the variables torch's launcher gives
    its processes (`pool.forked_ranks`; when one ends with an error, the others get SIGTERM).
    Returns a CompletedProcess whose stdout and stderr are the processes' together, or None where
    Accelerate would not start torch's launcher (one process, or a refused launch)."""
    from unittest import mock

    from accelerate.commands import launch as accelerate

    from toolkit.jobs import pool

    asked = {}

    def torchrun(launcher_args):  # what Accelerate would hand torch's launcher
        asked.update(env=dict(os.environ), args=launcher_args)

    parsed = accelerate.launch_command_parser().parse_args([*map(str, launch_args), str(REPO / "launch.py"),
                                                            *map(str, args)])
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(environment(env))
        with mock.patch.object(accelerate, "_run_torchrun", torchrun), \
                mock.patch.object(accelerate, "_run_subprocess", lambda *_: None):
            accelerate.launch_command(parsed)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if not asked:
        return None
    with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        ranks = pool.forked_ranks(command(args)[1:], int(asked["args"].nproc_per_node), asked["env"], cwd,
                                  output=(out, err), port=asked["args"].master_port)
        try:
            status = pool.wait_ranks(ranks, timeout)
        except subprocess.TimeoutExpired:
            raise subprocess.TimeoutExpired(command(args), timeout, out.read_text(), err.read_text()) from None
        return subprocess.CompletedProcess(command(args), status, out.read_text(), err.read_text())


def in_this_process(args, cwd, env=None):
    import launch as cli

    args = [str(arg) for arg in args]
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ), os.getcwd(), sys.argv, torch.get_num_threads()
    run_environment = environment(env)
    os.environ.clear()
    os.environ.update(run_environment)
    if (env or {}).get("OMP_NUM_THREADS"):  # read when torch starts, which it has here: set it as it would
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(cwd)
    sys.argv = [str(REPO / "launch.py"), *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), as_a_process():
            try:
                status = cli.main(args)
            except SystemExit as e:  # argparse's usage errors, sys.exit(...)
                status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)  # as Python prints sys.exit("text")
            except Exception:  # what Python does with an uncaught exception
                traceback.print_exc()
                status = 1
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        os.chdir(saved[1])
        sys.argv = saved[2]
        torch.set_num_threads(saved[3])
        forget_the_run()
    return subprocess.CompletedProcess(["launch.py", *args], status, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def as_a_process():
    """Warnings and other libraries' log records go to stderr, as in a process of its own (pytest
    would otherwise keep them), so that a test of what a run prints sees them."""
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []  # pytest's; without any, logging prints to stderr
    with warnings.catch_warnings():
        warnings.resetwarnings()  # Python's default filters, not pytest's
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = show_warning
        try:
            yield
        finally:
            root.handlers = handlers


def show_warning(message, category, filename, lineno, file=None, line=None):
    """Python's own way of showing a warning: on stderr (the one of the moment: redirected here)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def forget_the_run():
    """What a run leaves in its process, which the next run in it must not inherit: Accelerate's
    process state (as Accelerate's own tests reset it) and torch's determinism switch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False


def start(args, cwd, launcher=(), env=None, output=True):
    """Start `launch.py` without waiting; stdout and stderr are pipes (text), or discarded."""
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} if output else \
        {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return subprocess.Popen(command(args, launcher), cwd=cwd, env=environment(env), **streams)


def ok(result):
    """`result` (a CompletedProcess) succeeded; else fail with the end of its stderr."""
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def accelerate_launch(*launch_args):
    """The `accelerate launch` command of this Python environment, with its own arguments."""
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args]


def two_processes(flags=False):
    """`accelerate launch` of 2 processes on a free port, with accelerate_configs/multi_gpu.yaml,
    or with the same settings as flags (`flags=True`). Run it with env=CPU."""
    how = ["--multi_gpu"] if flags else ["--config_file", REPO / "accelerate_configs" / "multi_gpu.yaml"]
    return accelerate_launch(*how, "--num_processes", "2", "--main_process_port", free_port())


def launch_two(args, cwd, env=None, timeout=300, flags=False, fresh=False):
    """`launch` on 2 CPU processes through `accelerate launch` (see `two_processes`): forks, or
    `fresh` processes of the launcher (a test of how a failure or a signal ends them)."""
    return launch(args, cwd, launcher=two_processes(flags), env={**CPU, **(env or {})}, timeout=timeout, fresh=fresh)


def wait_until(condition, process=None, timeout=120, what="the condition"):
    """Poll `condition()` until it is true; fail if `process` ends first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None:
            assert process.poll() is None, f"the process ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)  # a poll interval, not a guess at how long something takes


def run_dirs(output_dir):
    """Run folders under `output_dir` (any recipe)."""
    return sorted(p for p in Path(output_dir).glob("*/*") if p.is_dir())


def only_run(output_dir):
    runs = run_dirs(output_dir)
    assert len(runs) == 1, f"expected one run folder, found {runs}"
    return runs[0]


def copy_run(run, tmp_path):
    """A copy of the run folder `run` (a shared fixture's) at tmp_path/runs/<recipe>/<name>, with
    its symlinks (checkpoints/latest, best) as symlinks."""
    copy = Path(tmp_path) / "runs" / run.parent.name / run.name
    shutil.copytree(run, copy, symlinks=True)
    return copy


def weights(run, which="latest"):
    """The model weights of a run's checkpoint (latest, best or a folder name)."""
    from safetensors.torch import load_file

    from toolkit.state import checkpoint

    return load_file(checkpoint.find(run, which) / "model.safetensors")


def assert_same_weights(a, b):
    """Two state dicts hold the same tensors, bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def records(run, split):
    """metrics.jsonl's records of one split (train, val, val_ema, test)."""
    return [r for r in read_jsonl(Path(run) / "metrics.jsonl") if r["split"] == split]


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def make_cifar10(root, n_train=600, n_test=200, seed=0):
    """Tiny CIFAR-10 in the binary format: class c is an image of colour c's hue, plus noise."""
    g = torch.Generator().manual_seed(seed)
    folder = Path(root) / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    palette = torch.randint(0, 256, (10, 3, 1, 1), generator=g)

    def records(n):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = (palette[labels] + torch.randint(-40, 40, (n, 3, 32, 32), generator=g)).clamp(0, 255)
        return torch.cat([labels.view(n, 1), images.view(n, -1)], 1).to(torch.uint8).numpy().tobytes()

    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(records(n_train // 5))
    (folder / "test_batch.bin").write_bytes(records(n_test))
    return Path(root)
