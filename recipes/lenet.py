"""LeNet-5 on MNIST or Fashion-MNIST.

    python launch.py recipes/lenet.py                                   # MNIST, downloaded to data/
    python launch.py recipes/lenet.py data.name=fashion_mnist data.root=/usr/share/datasets/fashion-mnist

A recipe is this one file: its default `config`, and `datasets`, `model`, `loss` (plus the
optional `metrics`). Copy it to start a new task; everything else is configured, not coded.
"""

import torch
import torch.nn.functional as F
from torch import nn

from toolkit import UserError
from toolkit.data import TensorDataset, load_mnist

config = {
    "data": {
        "name": "mnist",       # mnist | fashion_mnist | kmnist
        "root": "data",        # IDX files here (or in <root>/<MNIST|FashionMNIST>/raw), gzipped or not
        "download": True,      # download into root when the files are not there
        "val_size": 5000,      # held out from the training files, the same samples for every seed
    },
    "epochs": 8,               # with the cosine schedule: 90% Fashion-MNIST test accuracy by epoch 5
    "batch_size": 128,         # on 2 CPU cores: 25% more samples/s than 64, the same accuracy per epoch
    "optim": {"lr": 5e-3},
    "sched": {"name": "cosine", "warmup_epochs": 0.5},
    "channels_last": True,     # NHWC convolution weights: 17% more samples/s on 2 CPU cores, faster on GPUs
    "checkpoint": {"monitor": "val/accuracy", "mode": "max"},
}


def datasets(cfg):
    raw = load_mnist(cfg.data.name, cfg.data.root, download=cfg.data.download)
    images, labels = raw["train"]
    if not 0 <= cfg.data.val_size < len(images):
        raise UserError(f"data.val_size={cfg.data.val_size} must be in [0, {len(images)}): "
                        f"the training files hold {len(images)} samples")
    # A fixed permutation (not the run's seed): every run validates on the same samples.
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    val, train = order[:cfg.data.val_size], order[cfg.data.val_size:]
    # Decode once into normalised float tensors; batches are then slices of memory.
    train_x = images[train].float().div_(255)
    mean, std = train_x.mean(), train_x.std()

    def prepare(x):  # uint8 [N, 28, 28] -> normalised float [N, 1, 28, 28]
        return (x if x.is_floating_point() else x.float().div_(255)).sub_(mean).div_(std).unsqueeze(1)

    splits = {"train": TensorDataset(prepare(train_x), labels[train])}
    if len(val):
        splits["val"] = TensorDataset(prepare(images[val]), labels[val])
    splits["test"] = TensorDataset(prepare(raw["test"][0]), raw["test"][1])
    return splits


def model(cfg):
    return LeNet5()


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling, for 28x28 inputs."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # 6 x 14 x 14
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),             # 16 x 5 x 5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def loss(model, batch, cfg):
    images, labels = batch
    logits = model(images)
    counts = {"correct": (logits.argmax(1) == labels).sum(), "samples": len(labels)}
    return F.cross_entropy(logits, labels), counts


def metrics(totals):
    return {"accuracy": totals["correct"] / totals["samples"]}
