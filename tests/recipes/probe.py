"""A test recipe that records, on every rank and step, which samples it trained on, the
augmentation noise it drew, a draw of the training step's RNG and the process group's timeout,
into <probe>.rank<RANK> (one JSON line per step)."""

import json
import os
import signal
import sys
import warnings

import torch
import torch.nn.functional as F

from toolkit.data import TensorDataset

config = {
    "probe": "",        # where to write the records ("": nowhere)
    "samples": 256,
    "nan_rank": -1,     # on this rank ...
    "nan_steps": [],    # ... the loss of these training steps (1-based, per process) is NaN
    "fail_rank": -1,    # on this rank ...
    "fail_step": 0,     # ... this training step raises, as a bad sample would
    "kill_step": 0,     # ... this training step kills its process (SIGKILL), as the kernel's OOM killer would
    "unused": False,    # the model has a layer that loss() never uses
    "warn": False,      # model() warns, as a library would (a FutureWarning)
    "memory": 0,        # a batch of more samples than this runs out of memory, as on a GPU (0: none does)
    "memory_rank": -1,  # ... on this rank only (-1: on every rank)
    "val": 0,           # a val split of this many samples (0: none)
}
_record, _nan_steps, _fail_step, _kill_step, _memory, _steps = None, (), 0, 0, 0, 0


def datasets(cfg):
    global _record, _nan_steps, _fail_step, _kill_step, _memory
    rank = int(os.environ.get("RANK", "0"))
    _record = f"{cfg.probe}.rank{rank}" if cfg.probe else None
    _nan_steps = cfg.nan_steps if rank == cfg.nan_rank else ()
    _fail_step = cfg.fail_step if rank == cfg.fail_rank else 0
    _kill_step = cfg.kill_step if rank == cfg.fail_rank else 0
    _memory = cfg.memory if cfg.memory_rank in (-1, rank) else 0
    x = torch.randn(cfg.samples, 4, generator=torch.Generator().manual_seed(0))
    y = (x.sum(1) > 0).long()

    def augment(batch):
        x, y, index = batch
        noise = torch.rand(len(x), 1)  # the global RNG, as augmentation would draw it
        return x + 0.01 * noise, y, index, noise

    splits = {"train": TensorDataset(x, y, torch.arange(cfg.samples), transform=augment, seed=cfg.seed)}
    if cfg.val:
        splits["val"] = TensorDataset(x[:cfg.val], y[:cfg.val], torch.arange(cfg.val), transform=augment, seed=cfg.seed)
    return splits


def model(cfg):
    if cfg.warn:
        warnings.warn("probe.model: this argument is deprecated", FutureWarning)
    net = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    if cfg.unused:
        net.register_parameter("unused", torch.nn.Parameter(torch.zeros(1)))  # never gets a gradient
    return net


def loss(model, batch, cfg):
    global _steps
    x, y, index, noise = batch
    if _memory and len(x) > _memory:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    dropped = torch.rand(1).item() if model.training else None  # the training step's own randomness
    if _record:
        with open(_record, "a") as f:
            f.write(json.dumps({"index": index.tolist(), "noise": noise.flatten().tolist(), "step_rng": dropped,
                                "deterministic": torch.are_deterministic_algorithms_enabled(),
                                "group_timeout_s": group_timeout_s(),
                                "datasets_imported": "datasets" in sys.modules}) + "\n")
    value = F.cross_entropy(model(x), y)
    if model.training:
        _steps += 1
        if _steps == _fail_step:
            raise ValueError(f"sample {index[0].item()} is corrupt")
        if _steps == _kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if _steps in _nan_steps:
            value = value * float("nan")
    return value, {"samples": len(y)}


def group_timeout_s():
    """The default process group's timeout in seconds (None in one process)."""
    if not torch.distributed.is_initialized():
        return None
    group = torch.distributed.distributed_c10d._get_default_group()
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
