"""What the benchmarks share: Fashion-MNIST, LeNet, a hand-written loop, running launch.py."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from toolkit import recipe  # noqa: E402
from toolkit.data.readers import load_mnist  # noqa: E402

FASHION_MNIST = os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
LENET = recipe.load(REPO / "recipes" / "lenet.py")


def fashion_mnist():
    """(train_x, train_y, test_x, test_y): normalised float tensors [N, 1, 28, 28], int64 labels."""
    raw = load_mnist("fashion_mnist", FASHION_MNIST, download=False)
    (x, y), (tx, ty) = raw["train"], raw["test"]
    mean, std = x.float().mean() / 255, x.float().std() / 255

    def prepare(images):
        return ((images.float() / 255 - mean) / std).unsqueeze(1)

    return prepare(x), y, prepare(tx), ty


def hand_written_epoch(model, optimizer, x, y, batch_size, mark=None):
    """The minimal loop: shuffle, slice batches from tensors in memory, step.
    Returns the samples seen and the seconds to `mark` steps (if given) and to the end."""
    model.train()
    order = torch.randperm(len(x))
    seen, marked, start = 0, None, time.perf_counter()
    for step, first in enumerate(range(0, len(x), batch_size)):
        if step == mark:
            marked = time.perf_counter() - start
        index = order[first:first + batch_size]
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(index)
    return seen, marked, time.perf_counter() - start


@torch.no_grad()
def accuracy(model, x, y, batch_size=1000):
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def launch(args, poll=None, timeout=600):
    """Run `python launch.py ARGS` in a temporary output_dir; return (seconds, run folder, result of
    `poll`). Without `poll` this just waits (a polling parent would take CPU from the measured run).
    `poll(run_dir)` is called every 20 ms while the process runs; when it returns something truthy,
    the process is stopped and that is the result, with the seconds until then."""
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    command = [sys.executable, str(REPO / "launch.py"), *args, f"output_dir={out}"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = None
    while poll is not None and process.poll() is None:
        run = next(iter(out.glob("*/*")), None)
        if run and (found := poll(run)):
            seconds = time.perf_counter() - start
            process.kill()
            process.wait()
            return seconds, run, found
        if time.perf_counter() - start > timeout:
            process.kill()
            raise TimeoutError(" ".join(command))
        time.sleep(0.02)
    _, err = process.communicate(timeout=timeout)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return seconds, next(out.glob("*/*")), found


def records(run, split=None):
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    complete = [json.loads(line) for line in lines if line.endswith("}")]
    return [r for r in complete if split is None or r["split"] == split]


def table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def free_port():
    """A free TCP port on the loopback address, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine():
    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
