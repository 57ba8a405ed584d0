"""Fixtures: tiny data, and trained runs that several tests share.

A shared run is trained once per session, through the real command line. Tests only read it, or
work on a copy of it (`helpers.copy_run`) in their own tmp_path."""

import pytest

from helpers import LENET, PROBE, launch, launch_two, make_mnist, ok, only_run


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """Tiny MNIST-format data: 3000 training and 1001 test samples, gzipped IDX files."""
    return make_mnist(tmp_path_factory.mktemp("mnist"))


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

    def __init__(self, tmp_path_factory, name, args, processes=1, env=None):
        self.tmp = tmp_path_factory.mktemp(name)
        self.args = args
        self.output_dir = self.tmp / "runs"
        train = launch_two if processes == 2 else launch
        self.result = ok(train([*args, f"output_dir={self.output_dir}"], cwd=self.tmp, env=env))
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
    each rank's samples, augmentation draws and step RNG are in `probe`.rank<RANK>."""
    tmp = tmp_path_factory.mktemp("probe")
    shared = Shared(tmp_path_factory, "probe-run", [PROBE, "batch_size=16", "epochs=2", "log_every=4", "trackers=[]",
                                                    "checkpoint.monitor=", f"probe={tmp / 'probe'}"], processes=2)
    shared.probe = tmp / "probe"
    return shared
