"""Streams: an `IterableDataset` (a stream without a length), read once per epoch.

A pass is split over slots (process x DataLoader worker) exactly once on each of the two axes,
either by the stream or by the toolkit. HF `datasets` streams and webdataset pipelines split
themselves, and the toolkit asks them how (`toolkit.data.libraries`); a stream that calls `stream_part()`
reads its slot's part; any other stream is read whole in every slot, and the toolkit keeps sample
`k` of the pass in slot `k % slots`. `StreamLoader` serves each process its part, in batches.
"""

import contextlib
import contextvars
import dataclasses
import itertools
import warnings

import torch
import torch.distributed as dist
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from accelerate.utils import send_to_device
from torch.utils.data import IterableDataset, get_worker_info
from torch.utils.data._utils import worker as _worker

from toolkit import UserError
from toolkit.data import draws
from toolkit.data.libraries import library_split, resumes_from_state
from toolkit.data.mapstyle import SharedEpoch, seed_sample, untouched_randomness


@dataclasses.dataclass
class _Reading:
    """What `stream_part()` tells a stream whose next sample the toolkit reads, and whether it asked."""
    slot: int
    slots: int
    seed: int
    epoch: int
    position: int  # of the next sample, in the part
    asked: bool = False


# Set while StreamPart reads a pass's first sample, which is when a stream asks stream_part()
_reading = contextvars.ContextVar("stream_reading", default=None)


def stream_part():
    """(index, count): which part of a stream this process and DataLoader worker reads.

    Call it in an `IterableDataset.__iter__`, before the first sample, to read only your part
    (items, files or shards `i` with `i % count == index`): that saves reading the whole stream in
    every worker, and the toolkit then passes every sample you yield through. Without the call,
    the toolkit reads the whole stream in each worker and keeps sample `k` of a pass in slot
    `k % count`. Outside the toolkit's loaders, or once the first sample is read, it returns (0, 1).
    """
    reading = _reading.get()
    if reading is None:
        return 0, 1
    reading.asked = True
    # the place in the pass of the part's next sample
    seed_sample(reading.seed, reading.epoch, reading.position * reading.slots + reading.slot)
    return reading.slot, reading.slots


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
        self.epoch = SharedEpoch()
        self._position, self._reads_its_part, self._resume = 0, False, None
        self.fetched = None  # with an evaluation's collate: the places in the pass of the samples yielded since it ran

    def set_epoch(self, epoch):
        self.epoch.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):  # e.g. a stream that shuffles its shards per epoch
            self.dataset.set_epoch(epoch)

    @property
    def splits_itself(self):
        """Whether the stream reads only its slot's part (a library's split, or stream_part(),
        known once a pass has read its first sample): then a slot's first samples depend on how
        many slots there are."""
        return self._reads_its_part or any(self.splits)

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
        known = self.splits[0] is not None  # a library's stream, whose split we know
        itself, kept = self._parts(self.splits if known else (False, False))
        slot = self._parts((True, True))[0]  # this slot of all, as stream_part() returns it
        # While the toolkit reads a sample of a stream whose split is not a library's, the stream (and
        # any library inside it) sees no DataLoader worker: the toolkit gives each worker its part,
        # which must not be split a second time. (torch's get_worker_info() returns this module global.)
        hide = not known and get_worker_info() is not None
        resume, self._resume = self._resume, None
        start, self._reads_its_part = (resume["position"], resume["reads_its_part"]) if resume else (0, False)
        if self._reads_its_part:
            itself, kept = slot, (0, 1)
        if resume:
            self.dataset.load_state_dict(resume["stream"])
        epoch, samples = int(self.epoch), iter(self.dataset)
        reading = _Reading(*slot, self.seed, epoch, start)  # what stream_part() answers before the first sample
        for position in itertools.count(start):
            index = position * itself[1] + itself[0]  # the sample's place in the pass
            if self.limit and index >= self.limit:
                return
            # The reader keeps these draws out of the training step's (StreamLoader).
            info = _worker._worker_info
            if hide:
                _worker._worker_info = None
            token = _reading.set(reading) if position == start else None
            try:
                seed_sample(self.seed, epoch, index)
                sample = next(samples)
            except StopIteration:
                return
            finally:
                if token is not None:
                    _reading.reset(token)
                _worker._worker_info = info
            self._position = position + 1
            if position == start and reading.asked and not self._reads_its_part:
                # stream_part() was called: the stream reads its part
                itself, kept, self._reads_its_part = slot, (0, 1), True
                if self.limit and position * itself[1] + itself[0] >= self.limit:
                    return
            if position % kept[1] == kept[0]:
                if self.fetched is not None:
                    self.fetched.append(index)
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
        self.seed = None if agree else seed  # evaluation: each batch comes with its samples' places, for their draws
        if self.seed is not None:
            collate_fn = draws.IndexedCollate(collate_fn, self.part, seed, training=False)
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

    length = None  # a stream's passes have no length known in advance

    @property
    def dataset(self):
        return self.part.dataset

    def prepare(self, accelerator, training):
        """Ready as it is: each process reads its own part, onto its own device."""
        return self

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
                if index >= skip and self.seed is None:
                    yield send_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
                elif index >= skip:
                    places, batch = batch
                    with draws.batch_draws(self.seed, places, self.device):  # while it is evaluated
                        yield send_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
                index += 1
        finally:
            self.end()
