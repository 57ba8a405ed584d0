"""A test recipe over a stream (an IterableDataset without a length) of `samples` numbered
samples in shards of uneven sizes. Each sample draws a noise value from torch's RNG as it is
read, as an augmentation would (noise=false: evaluation reads the same values with any number of
workers). The loss records, per rank, the numbers and noise of every batch
it trains on into <probe>.rank<RANK> (one JSON line per batch, padding repeats included)."""

import json
import os

import torch
import torch.nn.functional as F

from toolkit.data import stream_part

config = {
    "probe": "",             # where to write the records ("": nowhere)
    "samples": 203,          # in the whole stream
    "shards": 7,
    "split_itself": False,   # read only this slot's shards through stream_part(), or leave it to the toolkit
    "empty": False,          # a stream that yields nothing
    "noise": True,           # each sample draws its noise (false: 0.0), in evaluation too
    "sched": {"name": "constant"},
    "checkpoint": {"monitor": ""},
}


class Numbers(torch.utils.data.IterableDataset):
    def __init__(self, cfg):
        self.cfg = cfg
        bounds = torch.linspace(0, cfg.samples, cfg.shards + 1).round().long().tolist()
        self.shards = [range(a, b) for a, b in zip(bounds, bounds[1:])] if not cfg.empty else []

    def __iter__(self):
        index, count = stream_part() if self.cfg.split_itself else (0, 1)
        for shard in self.shards[index::count]:
            for i in shard:
                yield torch.tensor([float(i), torch.rand(()).item() if self.cfg.noise else 0.0])


def datasets(cfg):
    return {"train": Numbers(cfg)}


def model(cfg):
    return torch.nn.Linear(2, 1)


def loss(model, batch, cfg):
    if cfg.probe and model.training:
        with open(f"{cfg.probe}.rank{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps({"index": batch[:, 0].int().tolist(), "noise": batch[:, 1].tolist()}) + "\n")
    return F.mse_loss(model(batch).squeeze(1), batch[:, 1]), {"samples": len(batch)}
