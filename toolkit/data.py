"""Data: what the loop does with any dataset a recipe returns, and readers for the recipes' files.

- `TensorDataset`: tensors in memory, served a whole batch per indexing operation.
- `SeededSamples`: any other map-style dataset; each sample draws its randomness (torchvision
  transforms, numpy, `random`) from (seed, epoch, index), whatever the workers, processes or resumes.
- `StreamLoader`: an `IterableDataset` (a stream without a length); each process and worker reads
  its own part, and every process takes the same number of steps.
- IDX (MNIST-format) files and CIFAR-10 binary batches.
"""

import contextlib
import gzip
import itertools
import random
import struct
import sys
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from accelerate.utils import send_to_device
from torch.utils.data import IterableDataset, get_worker_info

from toolkit import UserError


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
        return tuple(t[i] for t in self.__getitems__([i]))

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

def _seed_sample(seed, epoch, index):
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


class _Epoch:
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
        self.dataset, self.seed, self.epoch = dataset, seed, _Epoch()
        self.seeded = not draws_nothing(dataset)
        self.fetch = getattr(dataset, "__getitems__", None)  # a Subset has one; it asks its dataset's

    def set_epoch(self, epoch):
        self.epoch.set_epoch(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, indices):
        if not self.seeded:
            return self.fetch(indices) if self.fetch is not None else [self.dataset[i] for i in indices]
        epoch = int(self.epoch)
        samples = []
        with _own_randomness():
            for i in indices:
                _seed_sample(self.seed, epoch, i)
                samples.append(self.dataset[i])
        return samples

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


# ---------------------------------------------------------------------------------------------
# Streams: an IterableDataset, read once per epoch, without a length.
#
# A pass is split over slots (process x DataLoader worker) exactly once on each of the two axes,
# either by the stream or by the toolkit. HF `datasets` streams and webdataset pipelines split
# themselves, and the toolkit asks them how (`library_split`); a stream that calls `stream_part()`
# reads its slot's part; any other stream is read whole in every slot, and the toolkit keeps sample
# `k` of the pass in slot `k % slots`.

_part = None  # (slot, slots, seed, epoch, position) while a stream's next sample is read by the toolkit
_split_itself = False


def stream_part():
    """(index, count): which part of a stream this process and DataLoader worker reads.

    Call it in an `IterableDataset.__iter__`, before the first sample, to read only your part
    (items, files or shards `i` with `i % count == index`): that saves reading the whole stream in
    every worker, and the toolkit then passes every sample you yield through. Without the call,
    the toolkit reads the whole stream in each worker and keeps sample `k` of a pass in slot
    `k % count`. Outside the toolkit's loaders it returns (0, 1).
    """
    global _split_itself
    if _part is None:
        return 0, 1
    slot, slots, seed, epoch, position = _part
    _split_itself = True
    _seed_sample(seed, epoch, position * slots + slot)  # the place in the pass of the part's next sample
    return slot, slots


def library_split(dataset, rank, world):
    """How a library's stream splits itself: (the stream, splits over processes, splits over
    DataLoader workers), or None for a stream of no library that we know.

    - HF `datasets.IterableDataset` splits over workers by itself (each worker reads its shards),
      and over processes after `split_dataset_by_node`, which is applied here unless the recipe did
      (then with this run's rank and number of processes, or the run is refused).
    - webdataset (`WebDataset`, `DataPipeline`) splits where its pipeline has `split_by_node` and
      `split_by_worker` (WebDataset's default `workersplitter`)."""
    hf = sys.modules.get("datasets")
    if hf is not None and isinstance(dataset, hf.IterableDataset):
        split = dataset._distributed
        if split is None and world > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
        elif split is not None and (split.rank, split.world_size) != (rank, world):
            raise UserError(f"an HF stream was split with split_dataset_by_node(rank={split.rank}, world_size="
                            f"{split.world_size}), but this is process {rank} of {world}: return the stream unsplit "
                            f"(the toolkit splits it), or split it with the run's rank and number of processes")
        return dataset, True, True
    wds = sys.modules.get("webdataset")
    if wds is not None and isinstance(dataset, wds.DataPipeline):
        stages = [getattr(stage, "__wrapped__", stage) for stage in dataset.pipeline]
        if wds.shardlists.single_node_only in stages and world > 1:
            raise UserError(f"a webdataset stream without a nodesplitter cannot be read by {world} processes: give "
                            f"WebDataset(..., nodesplitter=wds.split_by_node), and each process reads its shards")
        return dataset, wds.split_by_node in stages, wds.split_by_worker in stages
    return None


@contextlib.contextmanager
def _no_worker():
    """The stream (and any library inside it) sees no DataLoader worker while the toolkit reads it:
    the toolkit gives each worker its part, which must not be split a second time. (torch's
    get_worker_info() returns this module global, however it was imported.)"""
    from torch.utils.data._utils import worker

    info, worker._worker_info = worker._worker_info, None
    try:
        yield
    finally:
        worker._worker_info = info


def resumes_from_state(dataset):
    """Whether a resume can load the stream's own state instead of reading its pass again up to
    the checkpoint: the stream has `state_dict()` and `load_state_dict()` (HF `datasets` streams
    do), torchdata's StatefulDataLoader is installed (it collects the state of every DataLoader
    worker), and no part of the stream holds samples that its state leaves out: an HF stream's
    `.shuffle(buffer_size=...)` buffer is not in its state (resuming from it would lose them)."""
    if not (callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))):
        return False
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


class StreamPart(IterableDataset):
    """One slot's part of a stream (slot = process x workers + worker, of `slots`). The stream
    splits itself over the axes it knows (a library's: `library_split`; all of them after
    `stream_part()`); over the others the toolkit keeps every `count`-th sample that it yields (for
    a stream that splits nothing, sample `k` of a pass goes to slot `k % slots`). A sample draws its
    randomness from (seed, epoch, its place in the pass). With `limit`, a pass ends after its first
    `limit` samples.

    Its `state_dict()` (torchdata's Stateful protocol, asked after each batch in the process or
    worker that read it) is where the reading is: the stream's own state, and the place of the
    next sample; after `load_state_dict`, the next pass continues from there."""

    def __init__(self, dataset, rank, world, seed, limit=0):
        self.rank, self.world, self.seed, self.limit = rank, world, seed, limit
        library = library_split(dataset, rank, world)
        self.dataset, *self.splits = library or (dataset, None, None)  # splits: over processes, over workers
        self.epoch = _Epoch()
        self._position, self._reads_its_part, self._resume = 0, False, None

    def set_epoch(self, epoch):
        self.epoch.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):  # e.g. a stream that shuffles its shards per epoch
            self.dataset.set_epoch(epoch)

    def state_dict(self):
        if self._resume is not None:  # loaded, and not read from yet
            return self._resume
        return {"position": self._position, "reads_its_part": self._reads_its_part,
                "stream": self.dataset.state_dict()}

    def load_state_dict(self, state):
        self._resume = state

    def _parts(self, own):
        """((index, count) of the pass that the stream reads itself, (index, count) of what it reads
        that the toolkit keeps), for a stream that splits itself over processes and over DataLoader
        workers where `own` says so. Sample `k` that the stream yields is sample
        `k * count + index` of the pass (exactly so where the stream splits by sample)."""
        info = get_worker_info()
        axes = [(self.rank, self.world), (info.id, info.num_workers) if info else (0, 1)]
        parts = [[0, 1], [0, 1]]  # [the stream's, the toolkit's]
        for (index, count), its_own in zip(axes, own):
            part = parts[0 if its_own else 1]
            part[0], part[1] = part[0] * count + index, part[1] * count
        return parts

    def __iter__(self):
        global _part, _split_itself
        known = self.splits[0] is not None  # a library's stream, whose split we know
        itself, kept = self._parts(self.splits if known else (False, False))
        slot = self._parts((True, True))[0]  # this slot of all, as stream_part() returns it
        hide = _no_worker if not known and get_worker_info() is not None else contextlib.nullcontext
        resume, self._resume = self._resume, None
        start, self._reads_its_part = (resume["position"], resume["reads_its_part"]) if resume else (0, False)
        if self._reads_its_part:
            itself, kept = slot, (0, 1)
        if resume:
            self.dataset.load_state_dict(resume["stream"])
        epoch, samples = int(self.epoch), iter(self.dataset)
        for position in itertools.count(start):
            index = position * itself[1] + itself[0]  # the sample's place in the pass
            if self.limit and index >= self.limit:
                return
            with hide():  # the reader keeps these draws out of the training step's (StreamLoader)
                _seed_sample(self.seed, epoch, index)
                _part, _split_itself = (*slot, self.seed, epoch, position), False
                try:
                    sample = next(samples)
                except StopIteration:
                    return
                finally:
                    _part = None
            self._position = position + 1
            if position == start and _split_itself and not self._reads_its_part:
                # stream_part() was called: the stream reads its part
                itself, kept, self._reads_its_part = slot, (0, 1), True
                if self.limit and position * itself[1] + itself[0] >= self.limit:
                    return
            if position % kept[1] == kept[0]:
                yield sample


class StreamLoader(DataLoaderStateMixin):
    """Batches of this process's part of a stream, on its device.

    Accelerate would read a stream on the main process and send slices of each batch to the
    others, which needs batches of one size; here every process reads its own part instead,
    through a DataLoader with its own workers. Parts differ in length, so for training
    (`agree=True`) the processes agree before each batch on how many of them still have one: a
    pass ends when none has, and until then a process whose part has ended repeats its last batch
    as `padding` (the loop weighs it zero). Every sample is trained on once per pass, and no
    process waits in a collective that another never reaches. The agreement is one all-reduce
    of an integer on a CPU (gloo) group per batch; the accelerator never waits for it.

    A resume in the middle of a pass reads the pass again up to the checkpoint's batch, without
    training on it, unless the stream's own state can take it there (`resumes_from_state`): then
    the training loader is torchdata's StatefulDataLoader, a checkpoint keeps `resume_point()`,
    and `resume_from()` gives it back.
    """

    def __init__(self, dataset, batch_size, num_workers, collate_fn, processes, seed, agree, limit=0):
        self.part = StreamPart(dataset, processes.process_index, processes.num_processes, seed, limit)
        self.stateful = agree and resumes_from_state(self.part.dataset)
        if self.stateful:
            from torchdata.stateful_dataloader import StatefulDataLoader as Loader
        else:
            Loader = torch.utils.data.DataLoader
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on torch 2.9+
            self.loader = Loader(
                self.part, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                pin_memory=processes.device.type == "cuda",
                # Its own generator: starting a pass draws the workers' base seed from it, not from the
                # global RNG of the training step (dropout), which a resume restores mid-pass.
                generator=torch.Generator().manual_seed(seed + processes.process_index))
        self.device, self.agree = processes.device, agree
        self.group = dist.new_group(backend="gloo") if agree and processes.num_processes > 1 else None
        self.gradient_state = GradientState()  # tells accelerator.accumulate where a pass ends
        self.padding, self.ranks_with_data = False, processes.num_processes
        self.next_pass = (0, 0, None)  # (batches to skip, the first batch's number, the loader state it follows)
        self.resumed = None  # (batches, loader state): a checkpoint's resume point
        self.point = (0, None)  # (batches of this pass done, the loader state before the last one with data)

    @property
    def dataset(self):
        return self.part.dataset

    def set_epoch(self, epoch):
        self.part.set_epoch(epoch)

    def resume_point(self):
        """What a checkpoint keeps so that a resume need not read the pass again: {"batches": the
        batches of this pass done, "loader": the loader state before the last of them that held
        data}; None where a resume reads it again."""
        if not self.stateful:
            return None
        return {"batches": self.point[0], "loader": self.point[1], "workers": self.loader.num_workers,
                "batch_size": self.loader.batch_size}

    def resume_from(self, point):
        """The pass that `skip_first_batches(point["batches"])` asks for starts from `point` (this
        process's `resume_point()` in a checkpoint, or None). All processes must have one, or none
        uses it: each process's pass must take the same batches as the others'. A point saved with
        other DataLoader workers or another batch size (a resume may change num_workers) is not used."""
        usable = self.stateful and point is not None and (point["workers"], point["batch_size"]) == (
            self.loader.num_workers, self.loader.batch_size)
        if self.group is not None:
            flag = torch.tensor([int(usable)])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
            usable = bool(flag)
        self.resumed = (point["batches"], point["loader"]) if usable else None

    def skip_first_batches(self, batches):
        """The next pass without its first `batches` batches, for a resume in the middle of it.

        From a `resume_from` point, it starts at the loader state before the last trained batch
        that held data, and reads that batch again, untrained: a process whose part had ended
        repeats it as padding. Otherwise the pass is read again (and agreed on again) up to there."""
        start, self.resumed = self.resumed if self.resumed and self.resumed[0] == batches else None, None
        self.next_pass = (batches, batches - 1, start[1]) if start else (batches, 0, None)
        return self

    def _ranks_with(self, batch):
        """How many processes have a next batch (the same answer on every process)."""
        if self.group is None:
            return int(batch is not None)
        flag = torch.tensor([int(batch is not None)])
        dist.all_reduce(flag, group=self.group)
        return int(flag)

    def __iter__(self):
        (skip, index, state), self.next_pass = self.next_pass, (0, 0, None)
        self.begin()
        try:
            if state is not None:
                self.loader.load_state_dict(state)
            batches = iter(self.loader)

            def fetch():
                # Without workers the stream is read here, between training steps: its draws are kept
                # out of theirs, once per batch (saving numpy's generator costs 80 µs); a worker's
                # generators serve the data alone.
                with untouched_randomness() if self.loader.num_workers == 0 else contextlib.nullcontext():
                    return next(batches, None)

            upcoming, before = fetch(), state  # `before`: the loader state that `upcoming` follows
            have = self._ranks_with(upcoming)
            if not have and self.agree:  # in evaluation a part may be empty: `evaluate` checks the sum
                raise UserError("the train split (an IterableDataset) yielded no sample in this pass; an "
                                "IterableDataset must start over each time it is iterated")
            last = None
            while have:
                batch, self.padding, self.ranks_with_data = upcoming if upcoming is not None else last, \
                    upcoming is None, have
                if upcoming is not None:
                    self.point = (index + 1, before)
                    before = self.loader.state_dict() if self.stateful else None
                    upcoming = fetch()
                else:
                    self.point = (index + 1, self.point[1])
                last = batch
                have = self._ranks_with(upcoming)
                self.end_of_dataloader = not have
                if index >= skip:
                    yield send_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
                index += 1
        finally:
            self.end()


def resume_point(loader):
    """What a checkpoint keeps of the training loader's place (a stream's `resume_point()`), or None:
    a map-style loader's place is the checkpoint's batch count."""
    return loader.resume_point() if isinstance(loader, StreamLoader) else None


def set_epoch(loader, epoch):
    """Start epoch `epoch` (0-based) of a loader: its order and its samples' randomness are a
    function of (seed, epoch). Accelerate's loaders tell their sampler, not the dataset."""
    loader.set_epoch(epoch)
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------
# MNIST-format data: IDX files, gzipped or not.

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_SETS = {  # config name -> torchvision class, which also names the download folder
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "kmnist": "KMNIST",
}


def read_idx(path):
    """An IDX file (the MNIST format; `.gz` is decompressed) as a uint8 tensor of its shape."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        # In one call, which releases the GIL once: reading a GzipFile takes it back for every
        # chunk, and each time waits for whatever else runs (the torch._dynamo import in train).
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path} is not a complete gzip file ({e}); download it again") from None
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (the MNIST format)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != torch.Size(shape).numel():
        raise UserError(f"{path} is truncated: header says {shape}, found {len(body)} bytes of data")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_mnist(name, root, download=True):
    """{"train": (images, labels), "test": (images, labels)} for an MNIST-format data set.

    Images are uint8 [N, 28, 28], labels int64 [N]. Files are looked for in `root` and in
    `root/<MNIST|FashionMNIST|KMNIST>/raw` (torchvision's layout); if absent and `download`,
    torchvision downloads them there.
    """
    if name not in MNIST_SETS:
        raise UserError(f"data.name={name!r} is not one of {', '.join(MNIST_SETS)}")
    root = Path(root)
    folders = [root, root / MNIST_SETS[name] / "raw"]
    files, error = _find_mnist_files(folders), None
    if files is None and download:
        error = _download_mnist(name, root)
        files = _find_mnist_files(folders)
    if files is None:
        wanted = ", ".join(f"{f}[.gz]" for pair in MNIST_FILES.values() for f in pair)
        hint = ("on Debian/Ubuntu, `apt-get install dataset-fashion-mnist` and "
                "data.root=/usr/share/datasets/fashion-mnist" if name == "fashion_mnist"
                else f"copy them there from a machine with internet (torchvision.datasets.{MNIST_SETS[name]})")
        reason = f"; the download failed ({error})" if download else ""
        raise UserError(f"{name} data not found: expected {wanted} in {' or '.join(map(str, folders))}"
                        f"{reason}; {hint}")
    return {split: (read_idx(images), read_idx(labels).long()) for split, (images, labels) in files.items()}


def _find_mnist_files(folders):
    for folder in folders:
        found = {}
        for split, names in MNIST_FILES.items():
            paths = [next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in names]
            if None in paths:
                break
            found[split] = paths
        else:
            return found
    return None


def _download_mnist(name, root):
    """Download with torchvision (imported here: it costs a second of start-up). Returns the error."""
    import torchvision

    dataset = getattr(torchvision.datasets, MNIST_SETS[name])
    try:
        for train in (True, False):
            dataset(str(root), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - any failure becomes the reason in one clear message
        return _last_line(e)
    return None


def _last_line(error):
    """The last non-empty line of an exception's message (a download error's reason)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------
# CIFAR-10, binary version: fixed-size records, read without unpickling anything (the python
# version that torchvision uses is a pickle).

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}


def read_cifar_bin(path):
    """One CIFAR-10 binary batch: (uint8 images [N, 3, 32, 32], int64 labels [N])."""
    data = Path(path).read_bytes()
    if len(data) % 3073:
        raise UserError(f"{path} is not a CIFAR-10 binary batch (its size is not a multiple of 3073 bytes)")
    records = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32).clone(), records[:, 0].long()


def load_cifar10(root, download=True):
    """{"train": (images, labels), "test": (images, labels)} from <root>/cifar-10-batches-bin,
    downloaded there (the binary version, 162 MB) if absent and `download`."""
    folder = Path(root) / "cifar-10-batches-bin"
    missing = [f for files in CIFAR10_FILES.values() for f in files if not (folder / f).is_file()]
    error = None
    if missing and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR10_URL, str(root), md5=CIFAR10_MD5)
        except Exception as e:  # noqa: BLE001 - the reason goes into one clear message
            error = _last_line(e)
        missing = [f for files in CIFAR10_FILES.values() for f in files if not (folder / f).is_file()]
    if missing:
        reason = f"; the download failed ({error})" if error else ""
        raise UserError(f"CIFAR-10 not found: expected {', '.join(missing)} in {folder}{reason}; get "
                        f"{CIFAR10_URL} and unpack it in {root}")
    result = {}
    for split, files in CIFAR10_FILES.items():
        parts = [read_cifar_bin(folder / f) for f in files]
        result[split] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return result
