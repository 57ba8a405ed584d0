import pytest

from helpers import make_mnist


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """Tiny MNIST-format data: 3000 training and 1001 test samples, gzipped IDX files."""
    return make_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def tiny(mnist_root, tmp_path):
    """Overrides that point lenet.py at the tiny data and the run folders at tmp_path/runs, with
    batch 64 and a constant LR 1e-3: 32 steps per epoch, whatever the recipe's defaults are.

    val_size=1001 leaves 1999 training samples: neither split divides into whole batches."""
    return [f"data.root={mnist_root}", "data.val_size=1001", "data.download=false",
            f"output_dir={tmp_path / 'runs'}", "log_every=5", *TINY_TRAINING]


TINY_TRAINING = ["batch_size=64", "optim.lr=1e-3", "sched.name=constant", "sched.warmup_epochs=0"]
