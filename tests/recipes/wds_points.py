"""A test recipe over webdataset shards of points of the plane in three classes (by angle), which
splits itself over processes (split_by_node) and DataLoader workers (its default): each process
and worker reads whole shards of its own. `data.root` holds train-*.tar and val-*.tar, each sample
a JSON {"x": [x0, x1], "y": class}."""

import torch
import torch.nn.functional as F
import webdataset as wds

config = {
    "data": {"root": "shards"},
    "empty_check": False,  # webdataset's own: a worker without a shard fails
    "batch_size": 16,
    "eval_batch_size": 16,
    "max_steps": 20,
    "optim": {"lr": 0.02},
    "sched": {"name": "cosine"},
    "trackers": [],
}


def stream(pattern, cfg):
    return wds.WebDataset(pattern, nodesplitter=wds.split_by_node, shardshuffle=False,
                          empty_check=cfg.empty_check).decode() \
        .map(lambda sample: (torch.tensor(sample["json"]["x"]), sample["json"]["y"]))


def datasets(cfg):
    root = cfg.data.root
    return {"train": stream(f"{root}/train-{{0..3}}.tar", cfg), "val": stream(f"{root}/val-{{0..1}}.tar", cfg)}


def model(cfg):
    return torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def loss(model, batch, cfg):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"samples": len(y), "correct": (logits.argmax(1) == y).sum()}


def metrics(totals):
    return {"accuracy": totals["correct"] / totals["samples"]}
