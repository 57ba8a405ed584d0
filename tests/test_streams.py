"""Streams that split themselves (HF `datasets` streaming, webdataset) or not: every sample once per
pass with 0 or 2 DataLoader workers and 1 or 2 processes.

Each process's loader is built as the run builds it (`StreamLoader`, as for evaluation), here in one
test process, one rank after the other: the processes' parts are what the test counts."""

import itertools
import json
import os
from types import SimpleNamespace
from unittest import mock

import datasets
import pytest
import torch
import webdataset as wds
from datasets.distributed import split_dataset_by_node

from toolkit import UserError
from toolkit.data.libraries import resumes_from_state
from toolkit.data.streams import StreamLoader, stream_part

N = 250  # samples before the filter
KEPT = [i for i in range(N) if i % 7 != 3]  # after it


def read(make, processes, workers, env=lambda rank, world: {}):
    """The sample numbers that each of `processes` ranks reads in one pass of `make(rank, world)`."""
    parts = []
    for rank in range(processes):
        ranks = SimpleNamespace(process_index=rank, num_processes=processes, device=torch.device("cpu"))
        loader = StreamLoader(make(rank, processes), 16, workers, None, ranks, seed=0, agree=False)
        with mock.patch.dict(os.environ, env(rank, processes)):
            parts.append([int(i) for batch in loader for i in batch["x"]])
    return parts


def assert_each_once(parts, expected):
    everything = sorted(i for part in parts for i in part)
    assert everything == sorted(expected), f"{len(everything)} samples read, {len(expected)} in the pass"


TABLE = [(1, 0), (1, 2), (2, 0), (2, 2)]
CELLS = pytest.mark.parametrize("processes,workers", TABLE, ids=[f"{p}-processes-{w}-workers" for p, w in TABLE])


def hf_stream(shards):
    stream = datasets.Dataset.from_dict({"x": list(range(N))}).to_iterable_dataset(num_shards=shards)
    return stream.map(lambda e: {"y": e["x"] * 2}).filter(lambda e: e["x"] % 7 != 3).shuffle(seed=0, buffer_size=16)


class HFThroughStreamPart(torch.utils.data.IterableDataset):
    """The HF idiom inside a plain stream that reads its part: split_dataset_by_node(stream_part())."""

    def __init__(self, shards):
        self.stream = hf_stream(shards)

    def __iter__(self):
        part, parts = stream_part()
        yield from split_dataset_by_node(self.stream, rank=part, world_size=parts)


HF_WAYS = {
    "as-it-is": lambda shards: lambda rank, world: hf_stream(shards),
    "split_dataset_by_node": lambda shards: lambda rank, world: split_dataset_by_node(hf_stream(shards), rank, world),
    "through-stream_part": lambda shards: lambda rank, world: HFThroughStreamPart(shards),
}


@CELLS
@pytest.mark.parametrize("way", HF_WAYS)
@pytest.mark.parametrize("shards", [1, 4])
def test_an_hf_stream_is_read_once_per_pass(way, shards, processes, workers):
    assert_each_once(read(HF_WAYS[way](shards), processes, workers), KEPT)


def test_an_hf_stream_split_for_another_world_is_refused():
    with pytest.raises(UserError, match=r"split_dataset_by_node\(rank=0, world_size=4\), but this is process 0 of 2"):
        read(lambda rank, world: split_dataset_by_node(hf_stream(4), 0, 4), 2, 0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    for shard in range(4):
        with wds.TarWriter(str(folder / f"shard-{shard}.tar")) as tar:
            for i in range(shard * 50, shard * 50 + 50):
                tar.write({"__key__": f"{i:05d}", "cls": i})
    return sorted(str(p) for p in folder.glob("*.tar"))


def webdataset(urls, **splitters):
    return wds.WebDataset(urls, shardshuffle=False, empty_check=False, **splitters).decode().map(
        lambda sample: {"x": sample["cls"]})


RANKS = lambda rank, world: {"RANK": str(rank), "WORLD_SIZE": str(world)}  # noqa: E731 - what webdataset reads


SPLITTERS = [(splitters, p, w) for splitters in ("by-node-and-worker", "by-node", "by-worker") for p, w in TABLE
             if splitters != "by-worker" or p == 1]  # WebDataset's default nodesplitter: one process (test below)


@pytest.mark.parametrize("splitters,processes,workers", SPLITTERS, ids=[f"{s}-{p}-processes-{w}-workers"
                                                                        for s, p, w in SPLITTERS])
def test_a_webdataset_is_read_once_per_pass(shards, splitters, processes, workers):
    chosen = {"by-node-and-worker": {"nodesplitter": wds.split_by_node},
              "by-node": {"nodesplitter": wds.split_by_node, "workersplitter": None},
              "by-worker": {}}[splitters]
    parts = read(lambda rank, world: webdataset(shards, **chosen), processes, workers, RANKS)
    assert_each_once(parts, range(200))


def test_a_webdataset_without_a_nodesplitter_is_refused_with_several_processes(shards):
    with pytest.raises(UserError, match=r"nodesplitter=wds.split_by_node"):
        read(lambda rank, world: webdataset(shards), 2, 0, RANKS)


class SplitsByWorker(torch.utils.data.IterableDataset):
    """A plain stream that splits itself over the DataLoader workers without telling the toolkit."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        index, count = (info.id, info.num_workers) if info else (0, 1)
        yield from ({"x": i} for i in range(index, 100, count))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_plain_stream_that_splits_over_workers_itself_is_still_read_once(workers):
    assert_each_once(read(lambda rank, world: SplitsByWorker(), 2, workers), range(100))


class AsksLate(torch.utils.data.IterableDataset):
    """A stream that yields its first sample before it asks stream_part(), and then reads the part
    it is told."""

    def __iter__(self):
        yield {"x": 0}
        index, count = stream_part()
        yield from ({"x": i} for i in range(1, 100) if i % count == index)


@CELLS
def test_stream_part_asked_after_the_first_sample_says_the_whole_stream(processes, workers):
    """Too late to be heeded (the toolkit learns whether a stream reads its part at its first
    sample), so it answers (0, 1): the stream reads everything, and the toolkit keeps each sample
    in one slot."""
    assert_each_once(read(lambda rank, world: AsksLate(), processes, workers), range(100))


# ---------------------------------------------------------------------------------------------
# Resuming a training pass from the stream's own state (HF `IterableDataset.state_dict()`, through
# torchdata's StatefulDataLoader) rather than by reading it again up to the checkpoint.

def unshuffled_hf_stream(reads):
    """An HF stream that its state resumes exactly (no shuffle buffer); `reads` gets each row it maps."""
    def mapped(e):
        reads.append(e["x"])
        return {"y": e["x"] * 2}

    stream = datasets.Dataset.from_dict({"x": list(range(N))}).to_iterable_dataset(num_shards=2)
    return stream.map(mapped).filter(lambda e: e["x"] % 7 != 3)


def training_loader(stream, workers, peer_batches, first=0):
    """One process's training loader, beside a peer process whose part has `peer_batches` batches
    (this one repeats its last batch as padding until the peer's are done). `first`: the number
    in the pass of the batch that the loader reads first."""
    one = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    loader = StreamLoader(stream, 16, workers, None, one, seed=0, agree=True)
    peer = itertools.count(first)
    loader._ranks_with = lambda batch: int(batch is not None) + int(next(peer) < peer_batches)
    return loader


def pass_of(loader, stop=None):
    """(sample numbers, padding) of each batch of one pass, or of its first `stop` batches."""
    return [([int(i) for i in batch["x"]], loader.padding) for batch in itertools.islice(loader, stop)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [5, 16], ids=["mid-part", "while-padding"])
def test_a_resume_from_an_hf_streams_state_continues_the_pass_exactly(workers, stop):
    whole = pass_of(training_loader(unshuffled_hf_stream([]), workers, peer_batches=18))
    assert len(whole) == 18 and sum(padding for _, padding in whole) == 18 - 14  # 214 samples: 14 batches

    first = training_loader(unshuffled_hf_stream([]), workers, peer_batches=18)
    assert pass_of(first, stop) == whole[:stop]
    point = json.loads(json.dumps(first.resume_point()))  # what a checkpoint keeps

    reads = []
    again = training_loader(unshuffled_hf_stream(reads), workers, peer_batches=18, first=stop - 1)
    again.resume_from(point)
    assert pass_of(again.skip_first_batches(stop)) == whole[stop:]
    if workers == 0:  # read from the last trained batch with data on, not from the start
        assert len(reads) <= N - 16 * min(stop - 1, 13), f"{len(reads)} rows read again"


def test_an_hf_stream_with_a_shuffle_buffer_is_read_again_and_resumes_exactly():
    """The buffer is not in HF's state (resuming from it would lose its samples)."""
    shuffled = lambda: unshuffled_hf_stream([]).shuffle(seed=0, buffer_size=16)  # noqa: E731
    whole = pass_of(training_loader(shuffled(), 0, peer_batches=0))
    first = training_loader(shuffled(), 0, peer_batches=0)
    pass_of(first, 5)
    assert first.resume_point() is None
    again = training_loader(shuffled(), 0, peer_batches=0)
    again.resume_from(None)
    assert pass_of(again.skip_first_batches(5)) == whole[5:]


def test_a_resume_with_other_workers_reads_the_pass_again_rather_than_load_their_state():
    """num_workers may change on a resume: the state of 0 workers cannot place 2 of them."""
    whole = pass_of(training_loader(unshuffled_hf_stream([]), 2, peer_batches=0))
    first = training_loader(unshuffled_hf_stream([]), 0, peer_batches=0)
    pass_of(first, 5)
    again = training_loader(unshuffled_hf_stream([]), 2, peer_batches=0)
    again.resume_from(json.loads(json.dumps(first.resume_point())))
    assert pass_of(again.skip_first_batches(5)) == whole[5:]


def test_a_stream_whose_state_dict_wants_its_own_loader_s_counts_is_read_again_on_resume():
    """MosaicML's state_dict(num_samples, from_beginning) and litdata's want counts that only their
    own loaders keep: a resume reads the pass again up to its place instead of calling it."""
    class Counted(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(3)

        def state_dict(self, num_samples, from_beginning):
            return {}

        def load_state_dict(self, state):
            pass

    class Plain(Counted):
        def state_dict(self):
            return {}

    assert not resumes_from_state(Counted()) and resumes_from_state(Plain())
