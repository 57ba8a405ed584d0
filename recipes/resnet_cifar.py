"""A small ResNet (ResNet-20) on CIFAR-10, with batch-level augmentation and label smoothing.

    accelerate launch launch.py recipes/resnet_cifar.py                  # downloads to data/ (162 MB)
    python launch.py recipes/resnet_cifar.py precision=no channels_last=false   # on a CPU

Set up for GPUs: bf16 autocast and channels_last convolutions. Same contract as recipes/lenet.py:
`config`, `datasets`, `model`, `loss`, `metrics`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from toolkit import UserError
from toolkit.data import TensorDataset, load_cifar10

config = {
    "data": {
        "root": "data",        # holds cifar-10-batches-bin/ (the binary version: nothing unpickled)
        "download": True,      # download into root when the files are not there
        "val_size": 5000,      # held out from the training files, the same samples for every seed
        "augment": True,       # random 32x32 crop of the 4-pixel padded image, and horizontal flip
    },
    "depth": 20,               # 6n + 2 layers: 20, 32, 44, 56
    "label_smoothing": 0.1,
    "epochs": 30,
    "batch_size": 128,
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "sched": {"name": "onecycle"},
    "precision": "bf16",       # on GPUs; on a CPU, precision=no is faster
    "channels_last": True,
    "checkpoint": {"monitor": "val/accuracy", "mode": "max"},
}

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def datasets(cfg):
    if (cfg.depth - 2) % 6:
        raise UserError(f"depth={cfg.depth}: a CIFAR ResNet has 6n + 2 layers (20, 32, 44, 56)")
    raw = load_cifar10(cfg.data.root, download=cfg.data.download)
    images, labels = raw["train"]
    if not 0 <= cfg.data.val_size < len(images):
        raise UserError(f"data.val_size={cfg.data.val_size} must be in [0, {len(images)})")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    val, train = order[:cfg.data.val_size], order[cfg.data.val_size:]
    # Images stay uint8 in memory (a quarter of float32); batches are augmented and normalised
    # as they are served, drawing a fresh crop and flip per sample, epoch and rank.
    augment = augment_and_normalize if cfg.data.augment else normalize
    splits = {"train": TensorDataset(images[train], labels[train], transform=augment, seed=cfg.seed)}
    if len(val):
        splits["val"] = TensorDataset(images[val], labels[val], transform=normalize)
    splits["test"] = TensorDataset(*raw["test"], transform=normalize)
    return splits


def normalize(batch):
    images, labels = batch
    return (images.float() / 255 - MEAN) / STD, labels


def augment_and_normalize(batch):
    """A random 32x32 crop of each image padded by 4 pixels, and a horizontal flip of about half."""
    images, labels = batch
    n = len(images)
    padded = F.pad(images, (4, 4, 4, 4))
    rows = torch.randint(0, 9, (n, 1, 1, 1)) + torch.arange(32).view(1, 1, 32, 1)
    cols = torch.randint(0, 9, (n, 1, 1, 1)) + torch.arange(32).view(1, 1, 1, 32)
    cropped = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows, cols]
    flip = torch.rand(n) < 0.5
    cropped[flip] = cropped[flip].flip(3)
    return normalize((cropped, labels))


def model(cfg):
    return ResNet(blocks=(cfg.depth - 2) // 6)


class Block(nn.Module):
    def __init__(self, channels_in, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """He et al. (2016), the CIFAR variant: three stages of 16, 32 and 64 channels."""

    def __init__(self, blocks=3, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, channels_in = [], 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(Block(channels_in, channels, stride if i == 0 else 1))
                channels_in = channels
        self.stages = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def loss(model, batch, cfg):
    images, labels = batch
    logits = model(images)
    counts = {"correct": (logits.argmax(1) == labels).sum(), "samples": len(labels)}
    return F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing), counts


def metrics(totals):
    return {"accuracy": totals["correct"] / totals["samples"]}
