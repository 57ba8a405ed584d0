"""Fixtures: tiny data, the README's own recipes, and trained runs that several tests share.

A shared run is trained once per session, through the real command line. Tests only read it, or
work on a copy of it (`helpers.copy_run`) in their own tmp_path. When pytest-xdist runs the tests
in several processes, the first one to need a shared folder makes it and the others wait for it."""

import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

# One torch thread in this process (read when torch is imported, just below) and in every one it
# starts: the tests run as one process per core (pytest-xdist), and two threads on a busy core
# wait for each other at every parallel op (a 10 s training took minutes).
os.environ["OMP_NUM_THREADS"] = "1"
# The suite runs whatever the user's shell holds. Their tracker settings (WANDB_DIR, WANDB_MODE=online,
# MLFLOW_TRACKING_URI, ...) would send the tests' runs to their folders and accounts; Accelerate's
# (ACCELERATE_MIXED_PRECISION, and `accelerate config`'s file under HF_HOME) would change how the
# tests' runs train; a launcher's or a scheduler's (RANK, SLURM_JOB_ID, CUDA_VISIBLE_DEVICES) what
# they take themselves to be. Each test sets the variables it tests, in a clean environment, and
# HF_HOME is the session's own empty folder.
USER_VARIABLES = ("WANDB_", "MLFLOW_", "COMET_", "CLEARML_", "SWANLAB_", "TRACKIO_", "AIM_", "DVCLIVE_", "ACCELERATE_",
                  "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "SLURM_", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR",
                  "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_")
for name in [name for name in os.environ if name.startswith(USER_VARIABLES)]:
    del os.environ[name]
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402
from PIL import Image  # noqa: E402

from helpers import LENET, PROBE, REPO, launch, launch_two, make_mnist, ok, only_run  # noqa: E402


def shared_folder(tmp_path_factory, name, make):
    """A folder that `make(folder)` fills once per test session, for every xdist worker."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name  # the session's folder, above each worker's
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """Tiny MNIST-format data: 3000 training and 1001 test samples, gzipped IDX files."""
    return shared_folder(tmp_path_factory, "mnist", make_mnist)


TINY_TRAINING = ["batch_size=64", "optim.lr=1e-3", "sched.name=constant", "sched.warmup_epochs=0"]


def tiny_args(mnist_root):
    """Overrides that point lenet.py at the tiny data, with batch 64 and a constant LR 1e-3: 32
    steps per epoch, whatever the recipe's defaults are.

    val_size=1001 leaves 1999 training samples: neither split divides into whole batches."""
    return [f"data.root={mnist_root}", "data.val_size=1001", "data.download=false", "log_every=5", *TINY_TRAINING]


@pytest.fixture
def tiny(mnist_root, tmp_path):
    """`tiny_args` with the run folders in tmp_path/runs."""
    return [*tiny_args(mnist_root), f"output_dir={tmp_path / 'runs'}"]


class Shared:
    """A run trained once: `args` (what trained it, but output_dir), `output_dir`, `run` (its folder:
    read it, or copy it), `result` (the CompletedProcess) and `tmp` (its own folder, the cwd)."""

    def __init__(self, tmp_path_factory, name, args, processes=1, env=None, launcher=None):
        """`launcher()`: the command that starts the processes (see `launch`), else `processes`
        CPU processes through accelerate_configs/multi_gpu.yaml, or this one."""
        def make(folder):
            if launcher:
                train = functools.partial(launch, launcher=launcher(), timeout=600)
            else:
                train = launch_two if processes == 2 else launch
            result = ok(train([*args, f"output_dir={folder / 'runs'}"], cwd=folder, env=env))
            (folder / "result.json").write_text(json.dumps([result.returncode, result.stdout, result.stderr]))

        self.args = args
        self.tmp = shared_folder(tmp_path_factory, name, make)
        self.output_dir = self.tmp / "runs"
        self.result = subprocess.CompletedProcess(args, *json.loads((self.tmp / "result.json").read_text()))
        self.run = only_run(self.output_dir)


# Text values that YAML 1.1 would read as a number, a boolean and a time (sexagesimal): the saved
# config.yaml must give them back as text. The run does not use these keys (no wandb tracker).
LOOKS_LIKE_OTHER_TYPES = ["wandb.project=1e-4", "wandb.group=yes", "wandb.entity=12:30"]


@pytest.fixture(scope="session")
def lenet_run(mnist_root, tmp_path_factory):
    """LeNet, 3 epochs on the tiny data with the recipe's monitor (val/accuracy) and tensorboard."""
    return Shared(tmp_path_factory, "lenet", [LENET, *tiny_args(mnist_root), "epochs=3", *LOOKS_LIKE_OTHER_TYPES])


@pytest.fixture(scope="session")
def ema_run(mnist_root, tmp_path_factory):
    """LeNet, 3 epochs (96 steps) at lr 3e-4 with an EMA of the weights that picks the best
    checkpoint, and a checkpoint every 10 steps of which the newest 2 (and the best) are kept."""
    return Shared(tmp_path_factory, "ema", [LENET, *tiny_args(mnist_root), "epochs=3", "optim.lr=3e-4", "ema.decay=0.9",
                                            "checkpoint.monitor=val_ema/accuracy", "checkpoint.every_steps=10",
                                            "checkpoint.keep=2"])


@pytest.fixture(scope="session")
def probe_run(tmp_path_factory):
    """The probe recipe on 2 processes (accelerate_configs/multi_gpu.yaml), 2 epochs of 8 steps:
    each rank's samples, augmentation draws and step RNG are in `probe`.rank<RANK>. Its model has a
    parameter that gets no gradient, which DDP takes with ddp.find_unused_parameters=true."""
    shared = Shared(tmp_path_factory, "probe-run", [PROBE, "batch_size=16", "epochs=2", "log_every=4", "trackers=[]",
                                                    "checkpoint.monitor=", "probe=probe", "unused=true",
                                                    "ddp.find_unused_parameters=true"], processes=2)
    shared.probe = shared.tmp / "probe"  # relative to the run's working directory
    return shared


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """The README's recipes as files, and tiny data for each: features.pt, images/, shards/, lines.txt."""
    root = tmp_path_factory.mktemp("own_data")
    readme = (REPO / "docs" / "data.md").read_text()
    section = readme[readme.index("## Your own data"):]
    for name, code in re.findall(r"```python\n# (my_\w+\.py)\n(.*?)```", section, re.S):
        (root / name).write_text(code)
    g = torch.Generator().manual_seed(0)

    def features(n):
        x = torch.randn(n, 16, generator=g)
        return {"x": x, "y": (x[:, :4].sum(1) > 0).long()}

    torch.save(features(1500), root / "features.pt")
    (root / "shards").mkdir()
    for i in range(7):
        torch.save(features(100 + 37 * i), root / "shards" / f"{i:03d}.pt")
    for split, per_class in (("train", 20), ("val", 6)):
        for c in range(3):
            folder = root / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                image = (torch.rand(3, 32, 32, generator=g) * 80).byte()
                image[c] += 150  # the class is the bright channel
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{k}.png")
    # Real text, 100 validation lines and 320 training lines: 5 whole steps of 64 per epoch.
    source = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    lines = [line for line in source.read_text(encoding="utf-8").splitlines(keepends=True) if len(line) > 1]
    (root / "lines.txt").write_text("".join(lines[:420]), encoding="utf-8")
    return root
