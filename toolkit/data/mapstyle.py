"""Data: what the loop does with the map-style datasets a recipe returns.

- `TensorDataset`: tensors in memory, served a whole batch per indexing operation.
- `SeededSamples`: any other map-style dataset; each sample draws its randomness (torchvision
  transforms, numpy, `random`) from (seed, epoch, index), whatever the workers, processes or resumes.

Streams (an `IterableDataset`) are `toolkit.data.streams`; the recipes' file readers `toolkit.data.readers`.
"""

import contextlib
import random
import sys
import zlib

import torch
from torch.utils.data import IterableDataset, get_worker_info


class TensorDataset(torch.utils.data.Dataset):
    """Equal-length tensors held in memory, served a whole batch per indexing operation.

    A `DataLoader` calls `__getitems__` with the indices of one batch, so building a batch is one
    `tensor[indices]` per tensor instead of a `__getitem__` per sample plus a collate: about twice
    the throughput on CPU for MNIST-sized data. Sharding, shuffling, seeding and skipping still
    come from the (prepared) `DataLoader` and its sampler, exactly as for any map-style dataset.

    `transform(batch) -> batch`, if given, runs on each batch (e.g. augmentation). It may draw from
    torch's global RNG, which is seeded for the batch from `seed` and the batch's sample indices:
    the draws are a function of the batch alone, so they do not depend on prefetching, on the
    number of processes or on a resume in the middle of an epoch, and they leave the training
    step's randomness (dropout, ...) untouched. Ranks see different samples, so they draw
    differently.
    """

    def __init__(self, *tensors, transform=None, seed=0):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("TensorDataset needs one or more tensors of equal length")
        self.tensors = tensors
        self.transform = transform
        self.seed = seed

    def __len__(self):
        return len(self.tensors[0])

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = tuple(t[index] for t in self.tensors)
        if self.transform is None:
            return batch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(index.numpy().tobytes()))
            return self.transform(batch)

    def __getitem__(self, i):
        return tuple(t[0] for t in self.__getitems__([i]))

    @staticmethod
    def collate_fn(batch):
        """`__getitems__` already returns the batch; the DataLoader must not collate it again."""
        return batch


def has_length(dataset):
    """Whether `dataset` knows its length (a map-style dataset, or a stream with `__len__`)."""
    try:
        len(dataset)
    except TypeError:
        return False
    return True


def is_stream(dataset):
    return isinstance(dataset, IterableDataset)


# ---------------------------------------------------------------------------------------------
# Randomness per sample. A transform that draws from torch, numpy or `random` in `__getitem__`
# (every torchvision transform does) gets draws that are a function of (seed, epoch, index):
# the same with 0 or 8 workers, 1 or N processes, and after a resume in the middle of an epoch,
# yet different for every sample, epoch and seed.

def seed_sample(seed, epoch, index):
    """Seed the CPU random generators for one sample (about 12 µs). Only the CPU generator of
    torch: a GPU's generator belongs to the training step."""
    key = hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF  # ints hash alike everywhere; fits an int64
    torch.default_generator.manual_seed(key)
    random.seed(key)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(key & 0xFFFF_FFFF)


@contextlib.contextmanager
def _own_randomness():
    """Outside a DataLoader worker, keep the data's draws out of the training step's generators
    (dropout must not depend on which samples were loaded)."""
    if get_worker_info() is not None:  # a worker's generators serve the data alone
        yield
        return
    with untouched_randomness():
        yield


@contextlib.contextmanager
def untouched_randomness(device=None):
    """What runs inside draws from the CPU generators of torch, numpy and `random` (and of `device`,
    a GPU) without moving them: afterwards they are where they were."""
    numpy = sys.modules.get("numpy")
    python_state, numpy_state = random.getstate(), numpy.random.get_state() if numpy else None
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        yield
    random.setstate(python_state)
    if numpy:
        numpy.random.set_state(numpy_state)


class SharedEpoch:
    """The epoch, in shared memory: DataLoader workers, which hold copies of the dataset (kept
    between epochs with persistent workers), see it change."""

    def __init__(self):
        self.value = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self.value.fill_(epoch)

    def __int__(self):
        return int(self.value)


def draws_nothing(dataset):
    """Whether fetching samples of `dataset` surely draws no randomness: a list or tuple, torch's
    TensorDataset, an HF `datasets.Dataset` without a transform of its own (`set_transform`,
    `with_transform`), or a Subset of one of them. Anything else may (a torchvision transform)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if isinstance(dataset, (list, tuple, torch.utils.data.TensorDataset)):
        return True
    hf = sys.modules.get("datasets")
    return hf is not None and isinstance(dataset, hf.Dataset) and dataset.format["type"] != "custom"


class SeededSamples(torch.utils.data.Dataset):
    """A map-style dataset whose sample `i` draws its randomness from (seed, epoch, i).

    The loop wraps every map-style split in it, except `TensorDataset` (seeded per batch) and
    torch's own `TensorDataset` (no randomness). The cost is about 12 µs per sample, and a fetch
    per sample. A dataset that draws nothing (`draws_nothing`) is not seeded, and one with a batched
    fetch of its own (`__getitems__`: an HF `Dataset` reads a batch from Arrow in one call) is
    asked for the whole batch at once.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, SharedEpoch()
        self.seeded = not draws_nothing(dataset)
        self.fetched = []  # the indices of the last fetch: the batch that its collate makes (`IndexedCollate`)
        self.fetch = getattr(dataset, "__getitems__", None)  # a Subset has one; it asks its dataset's

    def set_epoch(self, epoch):
        self.epoch.set_epoch(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, indices):
        self.fetched = list(indices)
        if not self.seeded:
            return self.fetch(indices) if self.fetch is not None else [self.dataset[i] for i in indices]
        epoch = int(self.epoch)
        samples = []
        with _own_randomness():
            for i in indices:
                seed_sample(self.seed, epoch, i)
                samples.append(self.dataset[i])
        return samples

    def __getitem__(self, i):
        return self.__getitems__([i])[0]
