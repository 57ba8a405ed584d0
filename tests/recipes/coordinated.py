"""A test recipe whose datasets() coordinates the processes itself, as MosaicML's StreamingDataset
does: the main process writes the data, a torch.distributed barrier, then every process reads it.
Points and a linear classifier."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

config = {
    "data_dir": "",
    "batch_size": 16,
    "epochs": 1,
    "sched": {"name": "constant"},
    "optim": {"lr": 0.05},
    "checkpoint": {"monitor": ""},
    "trackers": [],
}


def datasets(cfg):
    path = Path(cfg.data_dir) / "points.pt"
    if not dist.is_initialized() or dist.get_rank() == 0:
        x = torch.randn(150, 4, generator=torch.Generator().manual_seed(0))
        torch.save(x, path)
    if dist.is_initialized():
        dist.barrier()  # the others read the file once it is written
    x = torch.load(path)
    points = list(zip(x, (x.sum(1) > 0).long()))
    return {"train": points[:100], "test": points[100:]}


def model(cfg):
    return torch.nn.Linear(4, 2)


def loss(model, batch, cfg):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"samples": len(y), "correct": (logits.argmax(1) == y).sum()}


def metrics(totals):
    return {"accuracy": totals["correct"] / totals["samples"]}
