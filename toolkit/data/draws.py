"""Randomness in evaluation, per sample: what a loss or collate that draws (a diffusion loss's
noise and timesteps, a masked-LM collate's mask, a VAE's sample) uses so that the metrics of one
set of weights on one split are a function of the weights, the seed and the samples alone: the same
with any number of processes and workers, any eval_batch_size, in a run's validation and test and
in `launch.py test`.

    from toolkit.data import draws

    def loss(model, batch, cfg):
        noise = draws.randn_like(latents)              # each sample's noise from its own generator
        t = draws.randint(0, 1000, latents)            # one timestep per sample
        ...

In evaluation of a map-style split, sample `i`'s generator is seeded with (cfg.seed, i); in a
training batch's collate, with (cfg.seed, the epoch, i), like the sample's own draws in
`__getitem__`, so that a resume and any number of workers give the same masks. In a training
loss they draw from the global generators (one seed per sample from torch's), as any draw there
does: the toolkit seeds them per process, and a resume restores them.

A loss or collate that draws from the global generators in evaluation (torch.randn) gets them
seeded per batch, with (cfg.seed, the batch's first sample): the same with any number of processes
and workers, but not with another eval_batch_size, whose batches hold other samples. A training
collate's global draws are seeded per batch likewise (with the epoch).
"""

import contextlib

import torch

from toolkit.data import mapstyle

EVALUATION = -1  # in the `epoch` of the seeds of evaluation's draws (epochs of training count from 0)
COLLATE = 1  # beside the epoch in the seeds of a training collate's draws
_batch = None  # (seed, the epoch or None in evaluation, the sample indices of the batch being read or collated)
_salt = 0  # `launch.py check` draws again with other seeds to see whether evaluation draws


def generators(n, device="cpu"):
    """`n` torch.Generators on `device`, one per sample of the batch: in evaluation, seeded with the
    run's seed and each sample's index in its split; else seeded from torch's global generator."""
    if _batch is None:
        seeds = torch.randint(2 ** 62, (n,)).tolist()
    else:
        seed, epoch, indices = _batch
        if len(indices) != n:
            raise ValueError(f"draws for {n} samples asked in a batch of {len(indices)}: give one draw per sample "
                             f"(the batch's first dimension)")
        seeds = [sample_seed(seed, i, epoch) for i in indices]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def randn_like(x):
    """A normal draw shaped like `x` (samples along its first dimension), each row from its sample's generator."""
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                        for g in generators(len(x), x.device)])


def rand_like(x):
    """A uniform draw in [0, 1) shaped like `x`, each row from its sample's generator."""
    return torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                        for g in generators(len(x), x.device)])


def randint(low, high, x):
    """One integer in [low, high) per sample of `x` (its first dimension), on its device."""
    return torch.cat([torch.randint(low, high, (1,), generator=g, device=x.device)
                      for g in generators(len(x), x.device)])


def sample_seed(seed, index, epoch=None):
    """The seed of sample `index`'s draws in evaluation (`epoch` None), or in a training collate."""
    return hash((seed, _kind(epoch), index)) & 0x7FFF_FFFF_FFFF_FFFF


def _kind(epoch):
    """What tells the seeds of evaluation's and of a training collate's draws from the sample's own."""
    return (EVALUATION, _salt) if epoch is None else (epoch, COLLATE)


@contextlib.contextmanager
def batch_draws(seed, indices, device=None, epoch=None):
    """Within: the batch of these sample `indices` is evaluated or collated (in training, in
    `epoch`), its draws are its samples', and the global generators (of the CPU, and of `device`,
    a GPU) are seeded with its first sample; afterwards they are as they were."""
    global _batch
    with mapstyle.untouched_randomness(device):
        mapstyle.seed_sample(seed, _kind(epoch), indices[0])
        if device is not None and device.type == "cuda":
            torch.cuda.manual_seed(sample_seed(seed, indices[0], epoch))
        _batch = (seed, epoch, indices)
        try:
            yield
        finally:
            _batch = None


@contextlib.contextmanager
def salted(salt):
    """Evaluation's draws from other seeds (`launch.py check`: do the metrics move with them?)."""
    global _salt
    _salt, before = salt, _salt
    try:
        yield
    finally:
        _salt = before


class IndexedCollate:
    """A collate that makes the batch with its samples' draws (a masked-LM collate's mask). Their
    places in the split are read from `samples`, the reader that fetched them in this process (a
    DataLoader worker collates what it fetched): its `fetched`, the places of the samples read since
    the last collate, and its `epoch` (a `mapstyle.SeededSamples`, or a stream's `StreamPart`, which
    keeps them only for such a collate). In evaluation, the batch comes with them, for the loss's
    draws; in training, its draws are also a function of the epoch."""

    def __init__(self, collate, samples, seed, training):
        self.collate, self.samples, self.seed = collate or torch.utils.data.default_collate, samples, seed
        self.training = training
        if samples.fetched is None:
            samples.fetched = []

    def __call__(self, batch):
        indices, self.samples.fetched = self.samples.fetched[-len(batch):], []
        epoch = int(self.samples.epoch) if self.training else None
        with batch_draws(self.seed, indices, epoch=epoch):
            made = self.collate(batch)
        return made if self.training else (indices, made)
