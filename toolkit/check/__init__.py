"""`launch.py check`: the toolkit's promises measured on a recipe and its config, in minutes, before
the long job. Each property is one function that does real work on the recipe's own data, model
and loss (an evaluation, a few dozen training steps, a resume) and returns a `Row`: PASS or FAIL
(SKIP where the recipe gives it nothing to measure), what it measured, and for a FAIL the fix.

    contract     the hooks, loss()'s (loss, counts) with samples and loss_per's count, a loss with
                 a gradient, checkpoint.monitor among validation's metrics
    repeatable   two calls of datasets() give the same lengths and the same first samples
    samples      an evaluation counts each sample once, with the same metrics, with 0 and 2
                 DataLoader workers and 2 processes: the split's first samples (a short stream:
                 all of it), as many as there are
    summable     eval_batch_size B and B/3 give the same metrics: the counts are sums
    learns       a few dozen steps on a few batches: their loss falls clearly
    resume       N steps unbroken against k steps, a stop, a resume and the rest: the same
                 weights, bit for bit, with the recipe's num_workers
    input        how much of a step waits for data

The training runs go to a temporary folder; their consoles are kept, and shown for a row that
fails with an error. The check runs in one process; for the count with 2 processes it starts
`torchrun` with 2 (on CPUs, gloo) and reads their counts back (`counts_main`).
"""

import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from toolkit import UserError, config
from toolkit.build import check_splits, sizes
from toolkit.data import mapstyle
from toolkit.metrics import check_counts
from toolkit.recipe import loss_problem
from toolkit.run.summary import Status
from toolkit.state import checkpoint, weights

LEARN_STEPS = 30  # optimizer steps on the same few batches
LEARN_BATCHES = 2
LEARN_FALL = 0.05  # their loss must fall by this fraction
RESUME_BATCHES = 4  # train batches per epoch of the resume check's two epochs
INPUT_BOUND = 0.5  # a step that waits for data more than this fraction of its time
WORKERS = 2  # the other number of DataLoader workers that the sample count is taken with
WHOLE_PASS = 8  # evaluation batches: a stream of at most this many is counted whole


@dataclasses.dataclass
class Row:
    """One property's verdict."""

    name: str
    ok: bool | None  # None: not measured (skipped)
    found: str  # what was measured, in the user's terms
    fix: str = ""
    seconds: float = 0.0
    console: str = ""  # the traceback of a recipe's error

    @property
    def verdict(self):
        return "SKIP" if self.ok is None else "PASS" if self.ok else "FAIL"


class Failed(Exception):
    """A property does not hold: what was measured, the fix, and the console of the work that
    failed (another process's), shown after the rows."""

    def __init__(self, found, fix="", console=""):
        super().__init__(found)
        self.found, self.fix, self.console = found, fix, console


class Skipped(Exception):
    """A property that this recipe gives nothing to measure: why."""


class Check:
    """The recipe, its config (the files and overrides of the command line, as a run would resolve
    them), a temporary folder, and what the properties measure once and share."""

    def __init__(self, recipe, files, overrides, folder, processes=2):
        self.recipe, self.files, self.overrides, self.folder = recipe, list(files), list(overrides), Path(folder)
        self.processes = processes
        self.cfg = self.resolve()
        self.splits = None  # the first call of datasets(), once the contract holds
        self.unbroken = None  # the resume check's unbroken run folder, for the data wait

    def resolve(self, *extra):
        """The config with `extra` overrides after the user's."""
        return config.resolve(self.recipe.config, self.files, [*self.overrides, *extra])

    def datasets(self):
        """The recipe's splits, as `build` calls datasets(): after set_seed(cfg.seed)."""
        from accelerate.utils import set_seed

        set_seed(self.cfg.seed, deterministic=self.cfg.deterministic)
        return self.recipe.datasets(self.cfg)

    def eval_samples(self, cfg):
        """How many samples of a split the evaluation checks read: two and a half batches and one."""
        return 2 * cfg.eval_batch_size + cfg.eval_batch_size // 2 + 1

    def reading(self, dataset):
        """How the sample count reads an evaluated split: (how many samples, how many it must count).
        A map-style split: its first `eval_samples`. A stream of at most WHOLE_PASS evaluation
        batches: all of it (its length, read here). A longer stream: its first `eval_samples` (to
        count as many with every number of workers and processes), if the toolkit splits it; if it
        splits itself (shards per worker, stream_part()), its first samples differ with the number
        of slots, and it is not read: (None, None)."""
        cfg = self.cfg
        limit = self.eval_samples(cfg)
        if not mapstyle.is_stream(dataset):
            return limit, min(limit, len(dataset))
        whole = WHOLE_PASS * cfg.eval_batch_size
        length = sum(1 for _ in itertools.islice(dataset, whole + 1))
        if length <= whole:
            return whole + 1, length
        return (None, None) if splits_itself(dataset, cfg.seed) else (limit, limit)

    def train_run(self, name, *extra, resume=None):
        """A training run of the recipe in <folder>/<name> (or, given `resume`, that run folder
        continued); its summary. The run's own records stay in its folder."""
        from toolkit import loop

        cfg = self.resolve("trackers=[]", f"output_dir={self.folder / name}", "name=run", "max_minutes=0",
                           "early_stop.patience=0", *extra)
        fresh_process_state()
        try:
            return loop.train(self.recipe, cfg, resume=resume)
        finally:
            fresh_process_state()


def fresh_process_state():
    """Forget what a run leaves in this process (Accelerate's state, torch's determinism switch),
    so that the next run in it starts as in a process of its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.use_deterministic_algorithms(False)


def evaluation(recipe, cfg, split, dataset, limit, num_workers, model=None, training=False):
    """The metrics (with `samples`) of `model` (default: a fresh model of the recipe) over the first
    `limit` samples of `dataset`, in this process's part when there are several, as a run's
    evaluation takes them (in training mode if `training`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from toolkit.evaluation import evaluate
    from toolkit.data.loaders import make_loader
    from toolkit.distributed import start_processes

    processes, cpu = start_processes(cfg)
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.precision)
    if model is None:
        set_seed(cfg.seed)  # the same initial weights for every evaluation
        model = recipe.model(cfg)
    model.to(accelerator.device)
    if not mapstyle.is_stream(dataset):
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    # A train split is read as evaluation reads val: in order, eval_batch_size at a time.
    loader = make_loader("val" if split == "train" else split, dataset, cfg, recipe, processes,
                         num_workers=num_workers, limit=limit)
    return evaluate(accelerator, model, loader.prepare(accelerator, training=False), recipe, cfg, split,
                    training=training)


# The properties, in the order they run -----------------------------------------------------------


def contract(check):
    from accelerate.utils import send_to_device

    from toolkit.evaluation import monitored
    from toolkit.data.loaders import make_loader

    recipe, cfg = check.recipe, check.cfg
    splits = check.splits = check.datasets()
    try:
        check_splits(splits, cfg)
    except UserError as e:
        raise Failed(str(e), "datasets() returns {'train': ..., 'val': ..., 'test': ...}") from None
    model = recipe.model(cfg)
    if not isinstance(model, torch.nn.Module):
        raise Failed(f"model() returned {type(model).__name__}, not a torch.nn.Module")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = make_loader("train", first(splits["train"], cfg.batch_size), cfg, recipe, PartialStateOf(device),
                         num_workers=0)
    batch = send_to_device(next(iter(loader)), device)
    result = recipe.loss.function(model.train(), batch, cfg)  # the recipe's own loss, unchecked
    problem = loss_problem(result)
    if problem:
        raise Failed(f"loss() {problem}", CONTRACT)
    loss, counts = result
    try:
        check_counts(counts, cfg.loss_per or "samples")
    except UserError as e:
        raise Failed(str(e), f"return the {cfg.loss_per!r} count from loss(), or set loss_per to one it returns")
    if not loss.requires_grad:
        raise Failed("loss() returned a loss without a gradient (computed under no_grad, or detached from the "
                     "model's output): training would not change the model",
                     "compute the loss from the model's output, without .detach(), .item() or torch.no_grad()")
    own = [hook for hook in ("metrics", "optimizer", "collate", "flops", "export") if _own(recipe, hook)]
    lengths = [f"{split} {'stream' if n is None else n}" for split, n in sizes(splits).items()]
    found = [", ".join(["hooks datasets", "model", "loss", *own]), f"splits {', '.join(lengths)}",
             f"counts {', '.join(counts)}"]
    monitor = cfg.checkpoint.monitor
    if monitor and "val" in splits:
        metrics = evaluation(recipe, cfg, "val", splits["val"], cfg.eval_batch_size, num_workers=0)
        try:
            monitored({"val": metrics, "val_ema": metrics}, monitor)
        except UserError as e:
            raise Failed(str(e), "set checkpoint.monitor to one of them (val/<name>), or \"\" for none") from None
        found.append(f"{monitor} reported")
    elif monitor:
        found.append(f"no val split: {monitor} unused")
    return "; ".join(found)


def repeatable(check):
    again = check.datasets()
    if sizes(again) != sizes(check.splits):
        raise Failed(f"datasets() gave split lengths {sizes(check.splits)}, then {sizes(again)}",
                     _SEED_FIX)
    for split, dataset in check.splits.items():
        for index, (one, other) in enumerate(zip(first_samples(dataset, check.cfg.seed),
                                                 first_samples(again[split], check.cfg.seed))):
            if not same(one, other):
                raise Failed(f"datasets() gave a different {split} split the second time, with the same seed: its "
                             f"sample {index} differs", _SEED_FIX)
    return f"two calls: the same lengths and first {FIRST} samples of {', '.join(check.splits)}"


CONTRACT = ("keep the recipe contract (README, Recipes): datasets(cfg), model(cfg), and loss(model, batch, cfg) "
            "returning (the batch's mean loss, {'samples': n, other counts summed over samples})")
_SEED_FIX = ("draw from torch's, numpy's or random's global generators: set_seed(cfg.seed) seeds them before "
             "datasets() runs, and the toolkit seeds them again for each sample it reads; a generator of your own "
             "needs cfg.seed in datasets(), and in __getitem__ gives a sample other draws when read in another order "
             "(use the global ones there); list files in sorted order")
FIRST = 3


def samples(check):
    """Each sample is counted once: an evaluation of the first samples of each eval split (a
    short stream: all of it) counts as many as there are, with 0 and 2 workers and 2 processes,
    and gives the same metrics in every way of reading them, which it would not if some read other
    samples."""
    cfg, results, unread = check.cfg, {}, []
    for split in eval_splits(check.splits):
        dataset = check.splits[split]
        stream = mapstyle.is_stream(dataset)
        limit, expected = check.reading(dataset)
        if limit is None:
            unread.append(split)
            continue
        ways = {f"1 process and {workers} workers": evaluation(check.recipe, cfg, split, dataset, limit, workers)
                for workers in (0, WORKERS)}
        what = (f"the {split} stream, whole" if expected < limit else f"the first {limit} samples of the {split} "
                f"stream") if stream else f"{expected} samples of the {split} split"
        if any(metrics["samples"] != expected for metrics in ways.values()):
            raise Failed(f"an evaluation of {what} counted "
                         + " and ".join(f"{metrics['samples']:g} with {way}" for way, metrics in ways.items())
                         + f", not {expected}", _STREAM_FIX if stream else _COUNT_FIX)
        results[split] = (what, expected, ways)
    not_counted = _UNREAD.format(", ".join(unread), WHOLE_PASS * cfg.eval_batch_size) if unread else ""
    if not results:
        raise Skipped(not_counted)
    if check.processes > 1:  # all splits at once
        for split, metrics in in_two_processes(check).items():
            results[split][2]["2 processes"] = metrics
    tolerance = tolerance_of(cfg)
    for split, (what, expected, ways) in results.items():
        (first_way, one), *others = ways.items()
        for way, metrics in others:
            differ = differences(one, metrics, tolerance)
            if differ:
                name, a, b = differ[0]
                stream = mapstyle.is_stream(check.splits[split])
                raise Failed(f"an evaluation of {what} gives {name}={a:.6g} with {first_way}, but {name}={b:.6g} with "
                             f"{way}: it reads other samples", _STREAM_FIX if stream else
                             _PROCESSES_FIX if way == "2 processes" else _SAMPLE_FIX)
    ways = f"0 and {WORKERS} workers" + (", and 2 processes" if check.processes > 1 else "")
    counted = ", ".join(f"{split} {expected}" for split, (_, expected, _) in results.items())
    return f"{counted} samples, counted once and with the same metrics with {ways}" + (
        f"; {not_counted}" if not_counted else "")


_UNREAD = ("not counted: {} (a stream of over {} samples that splits itself, whose first samples differ with the "
           "number of workers and processes)")


def splits_itself(dataset, seed):
    """Whether a stream reads only its slot's part: a library's split over workers or processes,
    or stream_part() (seen as it reads its first sample)."""
    from toolkit.data.streams import StreamPart

    part = StreamPart(dataset, 0, 1, seed)
    part.set_epoch(0)
    next(iter(part), None)
    return part.splits_itself


def tolerance_of(cfg):
    """How far two evaluations of the same samples may differ (their sums are taken in other orders)."""
    return 1e-4 if cfg.precision == "no" else 2e-2


def differences(one, other, tolerance):
    """[(metric, value in `one`, value in `other`)] of the numbers that differ beyond `tolerance`."""
    return [(name, value, other.get(name)) for name, value in one.items() if isinstance(value, (int, float))
            and not (isinstance(other.get(name), (int, float))
                     and math.isclose(value, other[name], rel_tol=tolerance, abs_tol=1e-6))]


def eval_splits(splits):
    """The splits whose samples an evaluation counts: val and test, else train."""
    return [split for split in ("val", "test") if split in splits] or ["train"]


_COUNT_FIX = ("counts['samples'] is the number of samples in the batch (len(labels)); a collate or loss that drops "
              "samples leaves them uncounted")
_SAMPLE_FIX = ("a sample must depend on its index and the seed alone: keep no state between __getitem__ calls (a "
               "cache filled as it is read, a counter), and draw from torch's, numpy's or random's global generator "
               "(seeded for each sample), not from a generator of your own")
_PROCESSES_FIX = ("datasets() must give every process the same data: draw with cfg.seed, not with RANK or another "
                  "value of the process (the toolkit gives each process its part)")
_STREAM_FIX = ("read the whole stream in __iter__, or only your part through toolkit.data.streams.stream_part(); do not "
               "split it by RANK or get_worker_info() yourself (the toolkit splits it once)")


def summable(check):
    cfg, split = check.cfg, eval_splits(check.splits)[0]
    big = cfg.eval_batch_size
    small = max(1, big // 3)
    limit = check.eval_samples(cfg)
    results = {size: evaluation(check.recipe, check.resolve(f"eval_batch_size={size}"), split,
                                check.splits[split], limit, num_workers=0) for size in (big, small)}
    differ = differences(results[big], results[small], tolerance_of(cfg))
    if differ:
        name, value, other = differ[0]
        raise Failed(f"the {split} metric {name} is {value:.6g} with eval_batch_size={big} but {other:.6g} with "
                     f"{small}: a count that is a per-batch mean or ratio, not a sum over samples",
                     "return sums from loss() (e.g. (pred == y).sum()) and turn them into ratios in metrics(totals)")
    return f"{split}: {', '.join(results[big])} agree with eval_batch_size {big} and {small}"


LEARNING = (f"debug.overfit_batches={LEARN_BATCHES}", f"max_steps={LEARN_STEPS}", f"epochs={LEARN_STEPS}",
            "sched.name=constant", "sched.warmup_steps=0", "sched.warmup_epochs=0", f"log_every={LEARN_STEPS}",
            "val_every=0", "val_every_steps=0", "checkpoint.monitor=", "checkpoint.every_steps=0",
            "checkpoint.every_epochs=0", "limit_batches.train=0")


def learns(check):
    """A model that learns fits the few batches it is trained on: their loss, on the same inputs
    (the same draws of dropout and augmentation) before and after, falls clearly. One that does
    not train leaves it as it was."""
    summary = finished(check.train_run("learns", *LEARNING))
    trained = checkpoint.find(summary.run_dir) / "model.safetensors"
    before, after = (fitted(check, weights) for weights in ("", trained))
    share = (before["loss"] - after["loss"]) / abs(before["loss"]) if before["loss"] else 0.0
    what = (f"the loss of the {before['samples']:g} train samples it trained on went from {before['loss']:.4g} to "
            f"{after['loss']:.4g} in {summary.steps} steps (constant LR {check.cfg.optim.lr:g}): ")
    what += f"{'down' if share >= 0 else 'up'} {abs(share):.1%}" if math.isfinite(after["loss"]) else "not finite"
    if not (share >= LEARN_FALL and math.isfinite(after["loss"])):
        raise Failed(f"{what}; it must fall by {LEARN_FALL:.0%}",
                     "the loss must come from the model's output, the optimizer must hold the model's "
                     "parameters (an optimizer hook's own model is not trained), and they must not be frozen; "
                     "or optim.lr is too small (or too large, for a loss that grows)")
    return what


def fitted(check, weights):
    """The metrics of the samples that the learns run trains on (debug.overfit_batches makes them
    its val split too), of the model it starts from, or with `weights`. Both are built as the run
    builds them (a stream that draws as it is read moves the generator before the model is made),
    and evaluated in training mode (batch statistics), in batches of the training's size, with the
    same draws of dropout."""
    from toolkit.build import build
    from toolkit.distributed import start_processes

    cfg = check.resolve(*LEARNING, f"eval_batch_size={check.cfg.batch_size}", "compile=false")
    processes, _ = start_processes(cfg)
    splits, model, _, _ = build(check.recipe, cfg, processes, weights, strict=True)
    return evaluation(check.recipe, cfg, "val", splits["val"], len(splits["val"]), 0, model, training=True)


def resume(check):
    cfg = check.cfg
    # A small train split holds fewer batches than the epochs are cut to.
    batches = math.ceil(len(first(check.splits["train"], RESUME_BATCHES * cfg.batch_size)) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches / cfg.grad_accum)
    total = 2 * steps_per_epoch
    stop = steps_per_epoch + max(1, steps_per_epoch // 2)  # in the middle of the second epoch
    if stop >= total:
        stop = steps_per_epoch
    # max_steps: a stream's schedule that spans the training needs it
    common = (f"limit_batches.train={RESUME_BATCHES}", "limit_batches.val=2", "epochs=2", f"max_steps={total}",
              f"checkpoint.every_steps={stop}", "checkpoint.keep=0", "log_every=1", "debug.fast_run=false",
              "debug.overfit_batches=0")
    unbroken = finished(check.train_run("unbroken", *common))
    check.unbroken = Path(unbroken.run_dir)
    stopped = check.folder / "resumed"
    shutil.copytree(check.unbroken, stopped, symlinks=True)
    for later in checkpoint.complete(stopped):
        if checkpoint.read_state(later).step > stop:
            shutil.rmtree(later)
    if checkpoint.read_state(checkpoint.find(stopped)).step != stop:
        raise Failed(f"the run saved no checkpoint at step {stop} (checkpoint.every_steps={stop})")
    finished(check.train_run("resumed", *common, resume=stopped))
    one = weights.load_safetensors(checkpoint.find(check.unbroken) / "model.safetensors")
    other = weights.load_safetensors(checkpoint.find(stopped) / "model.safetensors")
    differ = [name for name in one if not torch.equal(one[name], other.get(name, torch.empty(0)))]
    what = (f"{total} steps unbroken against {stop} steps, a stop, a resume and {total - stop} more "
            f"(num_workers={cfg.num_workers})")
    if differ:
        worst = max(differ, key=lambda name: _difference(one[name], other.get(name)))
        raise Failed(f"{what}: {len(differ)} of {len(one)} weight tensors differ (most: {worst}, by "
                     f"{_difference(one[worst], other.get(worst)):.3g})",
                     "what the training step depends on must be in the checkpoint: keep it in parameters or buffers "
                     "(register_buffer), not in Python attributes or globals (a step counter); draw randomness from "
                     "torch's global generator (saved and restored), not from a generator of your own"
                     + ("; on GPUs set deterministic=true" if torch.cuda.is_available() else ""))
    return f"{what}: all {len(one)} weight tensors equal, bit for bit"


def input_bound(check):
    if check.unbroken is None:
        raise Skipped("not measured: the resume check's run did not finish")
    # The first step of an epoch also waits for the workers to start (or for a new pass of a
    # stream) and its batch has no step before it to overlap with: the steps after it show how fast
    # the input keeps up.
    train = [row for row in records(check.unbroken) if row["split"] == "train" and "data_wait" in row]
    firsts = {min(row["step"] for row in train if row["epoch"] == epoch) for epoch in {row["epoch"] for row in train}}
    waits = [row["data_wait"] for row in train if row["step"] not in firsts]
    if not waits:
        raise Skipped("not measured: each epoch of the check's runs held one train batch, and no step came after "
                      "another of its epoch")
    wait = statistics.median(waits)
    what = f"a step waits for data {wait:.0%} of its time (median of {len(waits)} steps after an epoch's first, " \
           f"num_workers={check.cfg.num_workers})"
    if wait > INPUT_BOUND:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        raise Failed(what, f"raise num_workers (this machine has {cores} CPU cores)" if check.cfg.num_workers < 2
                     else "more num_workers, or less work per sample: decode or resize once, ahead of training")
    return what


PROPERTIES = [("contract", contract), ("repeatable", repeatable), ("samples", samples), ("summable", summable),
              ("learns", learns), ("resume", resume), ("input", input_bound)]


def check(path, files=(), overrides=(), processes=2, say=print):
    """Measure every property of the recipe at `path` with its config; `say` each row's line as it
    is measured; return the rows. A recipe that breaks the contract skips the others, which would
    fail for the same reason."""
    from toolkit import recipe as recipes

    if not Path(path).is_file() or Path(path).suffix != ".py":
        recipes.load(path)  # no recipe to check: the command's one-line error
    try:
        recipe = recipes.load(path)
    except recipes.RecipeError:
        raise  # it does not import: its traceback, as a run shows it
    except UserError as e:
        recipe, broken = None, Row("contract", False, str(e), CONTRACT)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minloop-check-") as folder:
        doctor = Check(recipe, files, overrides, folder, processes) if recipe else None
        for name, measure in PROPERTIES:
            if doctor is None and not rows:
                row = broken
            elif rows and rows[0].ok is False:
                row = Row(name, None, "the contract must hold first")
            else:
                row = run_one(name, measure, doctor)
            rows.append(row)
            say(line(row))
    return rows


def run_one(name, measure, doctor):
    """One property, what its work prints kept aside, and an error of the recipe's a FAIL."""
    console, start = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            row = Row(name, True, measure(doctor))
    except Failed as e:
        row = Row(name, False, e.found, e.fix, console=e.console)
    except Skipped as e:
        row = Row(name, None, str(e))
    except UserError as e:
        row = Row(name, False, str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - the recipe's own error: a FAIL, with its traceback
        row = Row(name, False, f"{type(e).__name__}: {e}".splitlines()[0],
                  console="".join(traceback.format_exception(e)))
    row.seconds = time.perf_counter() - start
    return row


def line(row):
    """A row as `launch.py check` prints it: property, verdict, time, what was measured."""
    return f"{row.name:<11} {row.verdict}  {row.seconds:5.1f}s  {row.found}"


def ending(rows):
    """What `launch.py check` prints after the rows: each FAIL's fix (and a recipe error's
    traceback), and the count."""
    lines = []
    for row in rows:
        if row.ok is False and (row.fix or row.console):
            lines += ["", f"{row.name}: {row.fix}" if row.fix else f"{row.name}: the recipe raised"]
            lines += ["    " + text for text in row.console.rstrip().splitlines()[-12:]]
    failed = [row.name for row in rows if row.ok is False]
    unmeasured = [row.name for row in rows if row.ok is None]
    lines += ["", f"{len(failed)} of {len(rows)} failed: {', '.join(failed)}" if failed else
              f"{len(rows) - len(unmeasured)} of {len(rows)} passed, not measured: {', '.join(unmeasured)}"
              if unmeasured else f"all {len(rows)} passed"]
    return "\n".join(lines)


# Helpers ------------------------------------------------------------------------------------------


def first(dataset, n):
    """The first `n` samples of a split (a stream's, read)."""
    import itertools

    if mapstyle.is_stream(dataset):
        return list(itertools.islice(dataset, n))
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))


def first_samples(dataset, seed):
    """The first samples that a loader of the split reads in its first epoch, with their randomness."""
    import itertools

    from toolkit.data.streams import StreamPart

    if mapstyle.is_stream(dataset):
        part = StreamPart(dataset, 0, 1, seed)
        part.set_epoch(0)
        return list(itertools.islice(part, FIRST))
    seeded = mapstyle.SeededSamples(dataset, seed)
    seeded.set_epoch(0)
    return [seeded[i] for i in range(min(FIRST, len(dataset)))]


def same(one, other):
    """Whether two samples are equal: tensors, arrays, images, numbers, text, nested in dicts and sequences."""
    if type(one) is not type(other):
        return False
    if torch.is_tensor(one):
        return one.shape == other.shape and one.dtype == other.dtype and torch.equal(one, other)
    if isinstance(one, dict):
        return one.keys() == other.keys() and all(same(one[k], other[k]) for k in one)
    if isinstance(one, (list, tuple)):
        return len(one) == len(other) and all(same(a, b) for a, b in zip(one, other))
    if hasattr(one, "tobytes"):  # numpy arrays, PIL images
        return getattr(one, "shape", None) == getattr(other, "shape", None) and one.tobytes() == other.tobytes()
    return one == other


def records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def finished(summary):
    if summary.status != Status.FINISHED:
        raise Failed(f"the run {summary.status}" + (f": {summary.error.splitlines()[0]}" if summary.error else ""))
    return summary


def _difference(one, other):
    if other is None or one.shape != other.shape:
        return math.inf
    return (one.double() - other.double()).abs().max().item()


def _own(recipe, hook):
    """Whether the recipe defines the optional `hook` itself."""
    return getattr(recipe.module, hook, None) is not None


class PartialStateOf:
    """What `make_loader` asks of the processes, for one process on `device`."""

    num_processes, process_index = 1, 0

    def __init__(self, device):
        self.device = device


# The count with 2 processes -----------------------------------------------------------------------


def in_two_processes(check):
    """{split: metrics} of an evaluation of each eval split in 2 processes (torchrun, on
    this machine's CPUs unless it has 2 GPUs)."""
    out = check.folder / "counts.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if torch.cuda.device_count() < 2:
        env["ACCELERATE_USE_CPU"] = "1"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(Path(__file__).resolve().parents[1] / "launch.py"), "check", str(check.recipe.path),
            *[f"--config={file}" for file in check.files], *check.overrides, f"--counts-to={out}"]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise Failed(f"the evaluation in 2 processes failed: {first_error(done.stderr) or done.returncode}",
                     "the end of their console follows; --processes 1 leaves the count with 2 processes out",
                     console=done.stderr)
    return json.loads(out.read_text())


def first_error(console):
    """The line of a launcher's console that says what failed: the toolkit's `error:` line, else the
    last exception line of a process's traceback (not the launcher's own ChildFailedError)."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in console.splitlines()]  # torchrun's prefix
    said = [line for line in lines if line.startswith("error: ")]
    raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line)
              and "ChildFailedError" not in line]
    return said[0] if said else raised[-1] if raised else ""


def counts_main(recipe, files, overrides, out):
    """In each of the 2 processes of `in_two_processes`: evaluate each eval split as `samples`
    does, with the recipe's num_workers, and write {split: metrics} to `out` from the main process."""
    from toolkit.build import same_everywhere
    from toolkit.distributed import start_processes

    doctor = Check(recipe, files, overrides, Path(out).parent, processes=1)
    cfg = doctor.cfg
    processes, _ = start_processes(cfg)
    with processes.main_process_first():
        doctor.splits = doctor.datasets()
    same_everywhere(doctor.splits, processes)
    limits = {split: doctor.reading(doctor.splits[split])[0] for split in eval_splits(doctor.splits)}
    counted = {split: evaluation(recipe, cfg, split, doctor.splits[split], limit, cfg.num_workers)
               for split, limit in limits.items() if limit is not None}
    if processes.is_main_process:
        Path(out).write_text(json.dumps(counted))
    processes.wait_for_everyone()
    processes.destroy_process_group()  # now: gloo's threads, ended at the interpreter's exit, may abort it
