"""Loaders: the batches of one split, behind the one small protocol that the loop and evaluation
use (`Loader`), whatever the data: `MapLoader` for a map-style dataset (Accelerate shards it over
the processes), `toolkit.data.streams.StreamLoader` for a stream (it shards itself)."""

import contextlib
import math
import sys
from typing import Iterable, Protocol

import accelerate
import torch

from toolkit.data import draws, mapstyle, streams


class Loader(Protocol):
    """What the loop asks of a split's loader."""

    length: int | None  # batches per pass on this process; None for a stream
    padding: bool  # the batch just served repeats an earlier one, to be weighed zero (a stream's part ended)
    ranks_with_data: int  # how many processes served a batch that counts, this time

    def prepare(self, accelerator, training: bool) -> "Loader":
        """Ready for the accelerator's processes and device; returns the loader to use."""

    def set_epoch(self, epoch: int) -> None:
        """Start pass `epoch` (0-based): the order and the samples' randomness are functions of (seed, epoch)."""

    def skip_first_batches(self, batches: int) -> Iterable:
        """The next pass without its first `batches` batches (a resumed epoch), with `end_of_dataloader`
        true at its last batch."""

    def resume_point(self) -> dict | None:
        """What a checkpoint keeps of the loader's place besides the batch count (a stream's state), or None."""

    def resume_from(self, point: dict | None) -> None:
        """Start the pass that `skip_first_batches` asks for from a checkpoint's `resume_point()` (None: none)."""

    def __iter__(self):
        """A whole pass."""


@contextlib.contextmanager
def datasets_unless_imported():
    """Accelerate's prepare_data_loader imports HF `datasets` with several processes, to ask whether
    the split is one of its IterableDatasets: a second of start-up in every process (it imports
    pandas), in every run of a recipe that never imported `datasets`. A split can only be one if
    the recipe imported it; until then, Accelerate is told that it is not installed."""
    if "datasets" in sys.modules:
        yield
        return
    import accelerate.data_loader as module

    available, module.is_datasets_available = module.is_datasets_available, lambda: False
    try:
        yield
    finally:
        module.is_datasets_available = available


class MapLoader:
    """A map-style split's torch DataLoader; `prepare` makes it Accelerate's, which shards each
    batch list over the processes (with the seedable sampler, so the order is a function of
    (seed, epoch)). `samples`: the `SeededSamples` it reads, told each epoch. `seed`: for
    evaluation, whose batches come with their samples' indices (`draws.IndexedCollate`), the seed of
    their draws (`toolkit.data.draws`)."""

    padding = False

    def __init__(self, loader, num_processes, samples=None, seed=None):
        self.loader, self.samples, self.ranks_with_data = loader, samples, num_processes
        self.seed, self.device = seed, None

    @property
    def length(self):
        return len(self.loader)

    def __len__(self):
        return len(self.loader)

    def prepare(self, accelerator, training):
        """Evaluation shards are not padded to equal length (even_batches=False), so every sample is
        counted exactly once; ranks may then run different numbers of batches, which `evaluate`
        allows. Training shards are: every rank takes the same steps."""
        accelerator.even_batches = training
        with datasets_unless_imported():
            self.loader = accelerator.prepare(self.loader)
        accelerator.even_batches = True
        self.device = accelerator.device
        return self

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)  # Accelerate's loaders tell their sampler, not the dataset
        if self.samples is not None:
            self.samples.set_epoch(epoch)

    def skip_first_batches(self, batches):
        return accelerate.skip_first_batches(self.loader, batches) if batches else self.loader

    def resume_point(self):
        return None  # the place is the checkpoint's batch count

    def resume_from(self, point):
        pass

    def __iter__(self):
        return iter(self.loader) if self.seed is None else self._evaluation_batches()

    def _evaluation_batches(self):
        """Each batch, while it is evaluated, with its samples' draws (toolkit.data.draws)."""
        for indices, batch in self.loader:
            with draws.batch_draws(self.seed, indices, self.device):
                yield batch


def make_loader(split, dataset, cfg, recipe, processes, num_workers=None, limit=None):
    """A `Loader` for one split; the training one shuffles. A dataset that serves whole batches
    (`toolkit.data.mapstyle.TensorDataset`, also inside a Subset) brings its own `collate_fn`; a recipe's
    `collate` wins. Other map-style datasets draw their samples' randomness from (seed, epoch,
    index); a stream (IterableDataset) gets a `StreamLoader`. `processes`: a PartialState or an
    Accelerator; `num_workers`: instead of cfg.num_workers; `limit`: a stream's pass ends after this
    many samples, instead of limit_batches' (a map-style split is cut by `build.limit_splits`)."""
    training = split == "train"
    num_workers = cfg.num_workers if num_workers is None else num_workers
    batch_size = cfg.batch_size if training else cfg.eval_batch_size
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        base = base.dataset
    collate = recipe.collate_for(cfg) or getattr(base, "collate_fn", None)
    if mapstyle.is_stream(dataset):
        if limit is None:
            limit = cfg.limit_batches[split] * batch_size * processes.num_processes
        return streams.StreamLoader(dataset, batch_size, num_workers, collate, processes, cfg.seed,
                                    agree=training, limit=limit)
    if not training and processes.num_processes > 1:
        # Evaluation shards whole batches: smaller ones where the split is small, so that every
        # process gets one (under sharded parameters each forward is a collective of them all).
        batch_size = max(1, min(batch_size, math.ceil(len(dataset) / processes.num_processes)))
    samples = None
    if not isinstance(base, (mapstyle.TensorDataset, torch.utils.data.TensorDataset)):
        dataset = samples = mapstyle.SeededSamples(dataset, cfg.seed)
        if not training or collate is not None:  # a collate's draws, and evaluation's, are the samples'
            collate = draws.IndexedCollate(collate, samples, cfg.seed, training)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=processes.device.type == "cuda",
        collate_fn=collate,
        # Its own generator (it seeds the workers), so that starting an epoch, or resuming in the
        # middle of one, draws nothing from the global RNG that the training step uses.
        generator=torch.Generator().manual_seed(cfg.seed + processes.process_index),
    )
    indexed = isinstance(collate, draws.IndexedCollate) and not training  # batches that come with their indices
    return MapLoader(loader, processes.num_processes, samples, seed=cfg.seed if indexed else None)


def steps_per_epoch(loader, cfg):
    """Optimizer steps per epoch, or None for a stream (build.check_splits made sure none is needed)."""
    return math.ceil(loader.length / cfg.grad_accum) if loader.length is not None else None
