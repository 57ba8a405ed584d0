"""Shared test helpers: tiny MNIST-format data and running the real command line."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LENET = str(REPO / "recipes" / "lenet.py")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


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


def launch(args, cwd, launcher=(), env=None, timeout=300):
    """Run `launch.py` as a user would; return the CompletedProcess (a hang becomes a failure)."""
    command = [*map(str, launcher)] if launcher else [sys.executable]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([*command, str(REPO / "launch.py"), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def accelerate_launch(*launch_args):
    """The `accelerate launch` command of this Python environment, with its own arguments."""
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args]


def run_dirs(output_dir):
    """Run folders under `output_dir` (any recipe)."""
    return sorted(p for p in Path(output_dir).glob("*/*") if p.is_dir())


def only_run(output_dir):
    runs = run_dirs(output_dir)
    assert len(runs) == 1, f"expected one run folder, found {runs}"
    return runs[0]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
