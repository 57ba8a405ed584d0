"""A test recipe for `launch.py check`: points of the plane in three classes (by angle), which an
MLP learns in a few steps. `breaks=<property>` breaks one property of the check the way a user's
recipe would; with breaks="" every property holds. `stream=true` serves the same points as
streams (IterableDataset)."""

import copy
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.data import TensorDataset

config = {
    "breaks": "",    # contract | repeatable | samples | summable | learns | resume | input | "" (none)
    "stream": False,
    "per_process": False,  # datasets() draws the held-out points with the process's RANK
    "per_worker": False,   # a val sample depends on the DataLoader worker that reads it
    "draws": False,        # loss() adds noise to the inputs in evaluation too, from the global generator
    "points": 300,   # train; val and test have 100 each
    "batch_size": 16,
    "eval_batch_size": 12,
    "optim": {"name": "adamw", "lr": 0.02, "weight_decay": 0.0},
    "sched": {"name": "constant"},
    "trackers": [],
    "checkpoint": {"monitor": "val/accuracy", "mode": "max"},
}


def points(n, generator):
    x = torch.randn(n, 2, generator=generator)
    return x, (torch.atan2(x[:, 1], x[:, 0]) + torch.pi).mul(3 / (2 * torch.pi)).long().clamp(max=2)


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, x, y, own_split):
        self.x, self.y, self.own_split = x, y, own_split

    def __iter__(self):
        # breaks=samples: the stream splits itself over processes behind the toolkit's back
        rank, world = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))) if self.own_split \
            else (0, 1)
        for i in range(rank, len(self.x), world):
            yield self.x[i], self.y[i]


def datasets(cfg):
    x, y = points(cfg.points, torch.Generator().manual_seed(0))
    # breaks=repeatable: the held-out points are drawn from a generator without a seed
    pool = points(1000, torch.Generator().manual_seed(1))
    chosen = np.random.default_rng().permutation(1000)[:200] if cfg.breaks == "repeatable" else \
        np.random.default_rng(int(os.environ.get("RANK", 0))).permutation(1000)[:200] if cfg.per_process else \
        np.arange(200)
    held = pool[0][chosen], pool[1][chosen]
    slow = (lambda batch: time.sleep(0.1) or batch) if cfg.breaks == "input" else None
    if cfg.stream:
        own = cfg.breaks == "samples"
        return {"train": Stream(x, y, own), "val": Stream(held[0][:100], held[1][:100], own)}
    val = (PerWorker if cfg.per_worker else TensorDataset)(held[0][:100], held[1][:100])
    return {"train": TensorDataset(x, y, transform=slow), "val": val,
            "test": TensorDataset(held[0][100:], held[1][100:])}


class PerWorker(torch.utils.data.Dataset):
    """Points whose value depends on the DataLoader worker that reads them, as a sample would that a
    per-process cache or a lazily opened file changes."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        worker = torch.utils.data.get_worker_info()
        return self.x[i] + (0 if worker is None else worker.id + 1), self.y[i]


class MLP(torch.nn.Module):
    def __init__(self, counts_calls):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        self.counts_calls, self.calls = counts_calls, 0

    def forward(self, x):
        out = self.net(x)
        if self.training and self.counts_calls:
            # breaks=resume: a schedule kept in a Python attribute, which no checkpoint saves
            self.calls += 1
            out = out * (1 + self.calls / 10)
        return out


def model(cfg):
    return MLP(counts_calls=cfg.breaks == "resume")


def optimizer(cfg, model):
    # breaks=learns: the optimizer holds the parameters of a copy of the model, not the model's
    trained = copy.deepcopy(model) if cfg.breaks == "learns" else model
    return torch.optim.AdamW(trained.parameters(), lr=cfg.optim.lr, weight_decay=0.0)


def loss(model, batch, cfg):
    x, y = batch
    if cfg.breaks == "samples" and not cfg.stream:  # far points are dropped: their samples go uncounted
        keep = x.norm(dim=1) < 2.0
        x, y = x[keep], y[keep]
    if cfg.draws:
        x = x + 0.1 * torch.randn_like(x)
    logits = model(x)
    correct = (logits.argmax(1) == y).sum()
    counts = {"samples": len(x), "correct": correct / len(y) if cfg.breaks == "summable" else correct}
    if cfg.breaks == "contract":
        counts.pop("samples")
    return F.cross_entropy(logits, y), counts


def metrics(totals):
    return {"accuracy": totals["correct"] / totals["samples"]}
