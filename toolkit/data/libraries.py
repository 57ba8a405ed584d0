"""The stream libraries the toolkit knows, and how their streams split themselves over processes
and DataLoader workers, and resume. A library is looked up in `sys.modules`, never imported here:
a recipe without it starts no slower.

A new library is one function in `LIBRARIES`: given a stream, the run's rank and number of
processes, it returns None when the stream is not the library's, else (the stream to read, whether
it splits itself over processes, whether over workers); a stream that cannot be read as it is
(split for another rank, say) is refused there with a `UserError`. Where a library's own state
leaves samples out, `resumes_from_state` says so.

A library whose streams read any sample by its index (litdata, MosaicML streaming) is read as a
map-style dataset instead (`by_index`, one function per library in `BY_INDEX`): the toolkit's sampler then gives each
sample once, in the run's seeded order, resumable mid-epoch, whatever the library's own split.
"""

import inspect
import sys

import torch

from toolkit import UserError


def hf_datasets(dataset, rank, world):
    """HF `datasets.IterableDataset` splits over workers by itself (each worker reads its shards),
    and over processes after `split_dataset_by_node`, which is applied here unless the recipe did
    (then with this run's rank and number of processes, or the run is refused)."""
    hf = sys.modules.get("datasets")
    if hf is None or not isinstance(dataset, hf.IterableDataset):
        return None
    split = dataset._distributed
    if split is None and world > 1:
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
    elif split is not None and (split.rank, split.world_size) != (rank, world):
        raise UserError(f"an HF stream was split with split_dataset_by_node(rank={split.rank}, world_size="
                        f"{split.world_size}), but this is process {rank} of {world}: return the stream unsplit "
                        f"(the toolkit splits it), or split it with the run's rank and number of processes")
    return dataset, True, True


def webdataset(dataset, rank, world):
    """webdataset (`WebDataset`, `DataPipeline`) splits where its pipeline has `split_by_node` and
    `split_by_worker` (WebDataset's default `workersplitter`)."""
    wds = sys.modules.get("webdataset")
    if wds is None or not isinstance(dataset, wds.DataPipeline):
        return None
    stages = [getattr(stage, "__wrapped__", stage) for stage in dataset.pipeline]
    if wds.shardlists.single_node_only in stages and world > 1:
        raise UserError(f"a webdataset stream without a nodesplitter cannot be read by {world} processes: give "
                        f"WebDataset(..., nodesplitter=wds.split_by_node), and each process reads its shards")
    return dataset, wds.split_by_node in stages, wds.split_by_worker in stages


LIBRARIES = (hf_datasets, webdataset)


def library_split(dataset, rank, world):
    """How a library's stream splits itself: (the stream, splits over processes, splits over
    DataLoader workers), or None for a stream of no library in `LIBRARIES`."""
    return next((found for known in LIBRARIES if (found := known(dataset, rank, world)) is not None), None)


def resumes_from_state(dataset):
    """Whether a resume can load the stream's own state instead of reading its pass again up to
    the checkpoint: the stream has `state_dict()` and `load_state_dict()` (HF `datasets` streams
    do), torchdata's StatefulDataLoader is installed (it collects the state of every DataLoader
    worker), and no part of the stream holds samples that its state leaves out: an HF stream's
    `.shuffle(buffer_size=...)` buffer is not in its state (resuming from it would lose them)."""
    if not (takes_no_arguments(getattr(dataset, "state_dict", None))
            and callable(getattr(dataset, "load_state_dict", None))):
        return False  # MosaicML's and litdata's state_dict() want their own loader's counts
    try:
        import torchdata.stateful_dataloader  # noqa: F401
    except ImportError:
        return False
    hf = sys.modules.get("datasets")
    if hf is not None and isinstance(dataset, hf.IterableDataset):
        nodes = [dataset._ex_iterable]
        while nodes:
            node = nodes.pop()
            if type(node).__name__ == "BufferShuffledExamplesIterable":
                return False
            nodes += [getattr(node, "ex_iterable", None), *getattr(node, "ex_iterables", ())]
            nodes = [n for n in nodes if n is not None]
    return True


def takes_no_arguments(method):
    """Whether `method` is callable as `method()`."""
    if not callable(method):
        return False
    try:
        inspect.signature(method).bind()
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): as torch and HF streams' are, callable
        pass
    return True


class ByIndex(torch.utils.data.Dataset):
    """A stream that reads any sample by its index (`stream[i]`), as a map-style dataset of its
    `length` samples."""

    def __init__(self, stream, length):
        self.stream, self.length = stream, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.stream[int(index)]

    def __repr__(self):
        return f"{type(self.stream).__name__} read by index"


def litdata(dataset):
    """litdata's `StreamingDataset` splits itself over processes when it is built (evening out the
    parts by dropping samples, unless drop_last=False) and over workers by its own counts, and
    resumes from a state that its own loader keeps; but it reads any sample by its global index
    (the index of its optimized chunks: `dataset[i]`, downloading the chunk that holds it). Read
    that way, in the toolkit's order: the library's `shuffle`, `drop_last` and `seed` do not apply."""
    ld = sys.modules.get("litdata")
    if ld is None or not isinstance(dataset, ld.StreamingDataset):
        return None
    if dataset.cache is None:
        dataset[0]  # litdata opens its index at its first read
    chunks = dataset.cache.get_chunk_intervals()  # (chunk start, its first and past-the-last sample, chunk end)
    return ByIndex(dataset, sum(roi_end - roi_start for _, roi_start, roi_end, _ in chunks))


def mosaicml(dataset):
    """MosaicML's `StreamingDataset` splits itself over processes and DataLoader workers with its
    own partitions (which repeat samples to even the parts), shuffles by its own epoch counter, and
    resumes from a state its own loader keeps; but it reads any sample by its global index
    (`dataset[i]`, downloading the shard that holds it). Read that way, in the toolkit's order, like
    litdata's. Building it calls collectives: such a recipe needs datasets_together=true."""
    mosaic = sys.modules.get("streaming")
    if mosaic is None or not isinstance(dataset, mosaic.StreamingDataset):
        return None
    return ByIndex(dataset, dataset.num_samples)  # len(dataset) is this process's part


BY_INDEX = (litdata, mosaicml)


def by_index(splits):
    """`splits` ({name: dataset}, as datasets() returns them) with every stream of a library in
    `BY_INDEX` read by index, as a map-style dataset."""
    if not isinstance(splits, dict):
        return splits  # refused later, in one line
    return {name: next((found for known in BY_INDEX if (found := known(ds)) is not None), ds)
            for name, ds in splits.items()}
