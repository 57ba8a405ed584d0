"""A test recipe whose validation loss is a known function of the learning rate.

One weight, from 0, learns y = 3x by SGD without momentum. For the learning rates the tests use
(below 0.3), each step shrinks the error by about a factor (1 - lr), so a larger lr gives a lower
val/loss at every validation: which trials a median pruner stops is predictable.

torch is imported inside the functions, so that the sweep and search processes of the tests, which
only read `config`, start without it (a second of CPU each, on a machine the tests share).
"""

import json
import os
import time
from pathlib import Path

config = {
    "samples": 256,
    "fail_above": 0.0,      # a training step raises when optim.lr is above this (0: never), as a diverging run would
    "step_seconds": 0.0,    # each training step sleeps this long, so that a test can stop a run half way
    "fetch_seconds": 0.0,   # each training batch takes this long to fetch, as from a slow disk
    "hang_rank": -1,        # the training steps of this rank block, from its third on (a hang)
    "where": "",            # write torch's thread count and this process's CPU cores to <where>/<name>.json
    "epochs": 3,
    "batch_size": 32,
    "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
    "trackers": [],
    "checkpoint": {"monitor": "val/loss", "mode": "min"},
}


def datasets(cfg):
    import torch

    from toolkit.data import TensorDataset

    if cfg.where:
        Path(cfg.where, f"{cfg.name}.json").write_text(json.dumps(
            {"threads": torch.get_num_threads(), "cores": sorted(os.sched_getaffinity(0))}))
    x = torch.randn(cfg.samples + 64, 1, generator=torch.Generator().manual_seed(0))
    y = 3 * x
    slow = (lambda batch: time.sleep(cfg.fetch_seconds) or batch) if cfg.fetch_seconds else None
    return {"train": TensorDataset(x[64:], y[64:], transform=slow), "val": TensorDataset(x[:64], y[:64])}


def model(cfg):
    import torch

    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    return net


TRAINED = [0]  # training steps of this process


def loss(model, batch, cfg):
    import torch.nn.functional as F

    x, y = batch
    if model.training:
        if cfg.fail_above and cfg.optim.lr > cfg.fail_above:
            raise ValueError(f"optim.lr={cfg.optim.lr} is above fail_above={cfg.fail_above}")
        time.sleep(cfg.step_seconds)
        TRAINED[0] += 1
        if TRAINED[0] > 2 and int(os.environ.get("RANK", "0")) == cfg.hang_rank:
            time.sleep(3600)
    return F.mse_loss(model(x), y), {"samples": len(x)}
