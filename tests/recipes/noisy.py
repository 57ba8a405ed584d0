"""A test recipe that draws in evaluation too: its collate masks inputs, as a masked-LM collator
does (from each sample's generator, toolkit.data.draws; mask=false: not), and its loss adds noise,
as a diffusion loss does: from each sample's generator (noise=per_sample), from the global
generators (noise=global), or not at all (noise=none). Map-style points, a linear classifier."""

import torch
import torch.nn.functional as F

from toolkit.data import draws

config = {
    "noise": "per_sample",  # per_sample | global | none
    "mask": True,           # collate zeroes a fifth of the inputs, per sample
    "zero_init": False,     # the model starts at zero: untrained, its outputs ignore the inputs and their noise
    "stream": False,        # val and test as streams (IterableDataset), which the toolkit splits
    "batch_size": 16,
    "eval_batch_size": 24,
    "epochs": 2,
    "sched": {"name": "constant"},
    "optim": {"lr": 0.05},
    "trackers": [],
}


def datasets(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    y = (x.sum(1) > 0).long()
    points = list(zip(x, y))
    splits = {"train": points[:200], "val": points[200:250], "test": points[250:]}
    if cfg.stream:
        splits["val"], splits["test"] = Stream(splits["val"]), Stream(splits["test"])
    return splits


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, samples):
        self.samples = samples

    def __iter__(self):
        return iter(self.samples)


def collate(batch, cfg):
    x = torch.stack([x for x, _ in batch])
    y = torch.stack([y for _, y in batch])
    if cfg.mask:
        x = x * (draws.rand_like(x) > 0.2)  # in a DataLoader worker, with 2 of them
    return x, y


def model(cfg):
    linear = torch.nn.Linear(4, 2)
    if cfg.zero_init:
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    return linear


def loss(model, batch, cfg):
    x, y = batch
    if cfg.noise == "per_sample":
        x = x + draws.randn_like(x)
    elif cfg.noise == "global":
        x = x + torch.randn_like(x)
    logits = model(x)
    counts = {"samples": len(y), "correct": (logits.argmax(1) == y).sum()}
    return F.cross_entropy(logits, y), counts


def metrics(totals):
    return {"accuracy": totals["correct"] / totals["samples"]}
