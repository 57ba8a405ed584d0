"""The properties of the recipe's hooks, data and counts, measured without training (a loss, calls
of datasets(), evaluations): contract, repeatable, samples, summable. Each property returns what it
measured, or raises `Failed` with the fix, which is written beside it."""

import itertools
import math

import torch

from toolkit import UserError
from toolkit.build import check_splits, sizes
from toolkit.check.count import in_two_processes
from toolkit.check.rows import Failed, Skipped
from toolkit.check.work import WHOLE_PASS, eval_splits, evaluation, first
from toolkit.data import mapstyle
from toolkit.distributed.processes import precision_of
from toolkit.metrics import check_counts
from toolkit.recipe import loss_problem

CONTRACT = ("keep the recipe contract (docs/recipes.md): datasets(cfg), model(cfg), and loss(model, batch, cfg) "
            "returning (the batch's mean loss, {'samples': n, other counts summed over samples})")


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


def _own(recipe, hook):
    """Whether the recipe defines the optional `hook` itself."""
    return getattr(recipe.module, hook, None) is not None


class PartialStateOf:
    """What `make_loader` asks of the processes, for one process on `device`."""

    num_processes, process_index = 1, 0

    def __init__(self, device):
        self.device = device


_SEED_FIX = ("a split must be a function of cfg.seed alone; what moves one between two calls is state that "
             "lives on: a generator of your own not seeded with cfg.seed (torch's, numpy's and random's global "
             "ones are seeded before datasets() runs and again for each sample read), files listed in directory "
             "order (sort them), a library's own counter or buffer that advances as it is read (an epoch counter, "
             "a shuffle buffer: give it cfg.seed and its first epoch), or the clock")
FIRST = 3  # the samples of each split that two calls of datasets() must give alike


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


def first_samples(dataset, seed):
    """The first samples that a loader of the split reads in its first epoch, with their randomness."""
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


WORKERS = 2  # the other number of DataLoader workers that the sample count is taken with
_COUNT_FIX = ("counts['samples'] is the number of samples in the batch (len(labels)); a collate or loss that drops "
              "samples leaves them uncounted")
_SAMPLE_FIX = ("a sample must depend on its index and the seed alone: keep no state between __getitem__ calls (a "
               "cache filled as it is read, a counter), and draw from torch's, numpy's or random's global generator "
               "(seeded for each sample), not from a generator of your own")
_PROCESSES_FIX = ("datasets() must give every process the same data: draw with cfg.seed, not with RANK or another "
                  "value of the process (the toolkit gives each process its part)")
_STREAM_FIX = ("read the whole stream in __iter__, or only your part through toolkit.data.streams.stream_part(); do "
               "not split it by RANK or get_worker_info() yourself (the toolkit splits it once)")
_UNREAD = ("not counted: {} (a stream of over {} samples that splits itself, whose first samples differ with the "
           "number of workers and processes)")


def samples(check):
    """Each sample is counted once: an evaluation of the first samples of each eval split (a
    short stream: all of it) counts as many as there are, with 0 and 2 workers and 2 processes,
    and gives the same metrics in every way of reading them, which it would not if some read other
    samples. The evaluation properties measure a model trained a few steps (`Check.trained`)."""
    cfg, results, unread = check.cfg, {}, []
    for split in eval_splits(check.splits):
        dataset = check.splits[split]
        stream = mapstyle.is_stream(dataset)
        limit, expected = check.reading(dataset)
        if limit is None:
            unread.append(split)
            continue
        trained = check.trained()
        ways = {f"1 process and {workers} workers": evaluation(check.recipe, cfg, split, dataset, limit, workers,
                                                               weights=trained) for workers in (0, WORKERS)}
        what = (f"the {split} stream, whole" if expected < limit else f"the first {limit} samples of the {split} "
                f"stream") if stream else f"{expected} samples of the {split} split"
        no_draws(check, split, dataset, limit, ways["1 process and 0 workers"], what)
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


_DRAWS_FIX = ("draw only in training (if model.training: ...), or, where evaluation must draw (a diffusion loss's "
              "noise, an MLM collate's mask), from a torch.Generator seeded with cfg.seed and the sample itself (its "
              "index or its content), so that a sample's draws do not depend on its batch, worker or process")


_PER_BATCH_FIX = ("draw per sample with toolkit.data.draws (draws.randn_like(x), draws.randint(0, n, x)): in "
                  "evaluation each sample draws from its own generator, so a metric does not depend on which "
                  "samples share its batch")


def no_draws(check, split, dataset, limit, metrics, what):
    """Fail, naming the cause, if `metrics` (an evaluation with 0 workers) move when the same
    evaluation runs again from other states of the global generators: loss() or collate draws."""
    cfg = check.cfg
    again = evaluation(check.recipe, cfg, split, dataset, limit, 0, draws_from=cfg.seed + 1, weights=check.trained())
    differ = differences(metrics, again, tolerance_of(cfg))
    if differ:
        name, value, other = differ[0]
        raise Failed(f"two evaluations of {what}, the same way but from other states of the global random "
                     f"generators, give {name}={value:.6g} and {name}={other:.6g}: loss() or collate draws random "
                     f"numbers in evaluation", _DRAWS_FIX)


def tolerance_of(cfg):
    """How far two evaluations of the same samples may differ (their sums are taken in other orders):
    1e-4 in float32 (the default, precision null without a launcher's setting), 2e-2 in bf16/fp16."""
    return 1e-4 if precision_of(cfg) == "no" else 2e-2


def differences(one, other, tolerance):
    """[(metric, value in `one`, value in `other`)] of the numbers that differ beyond `tolerance`."""
    return [(name, value, other.get(name)) for name, value in one.items() if isinstance(value, (int, float))
            and not (isinstance(other.get(name), (int, float))
                     and math.isclose(value, other[name], rel_tol=tolerance, abs_tol=1e-6))]


def summable(check):
    cfg, split = check.cfg, eval_splits(check.splits)[0]
    big = cfg.eval_batch_size
    small = max(1, big // 3)
    limit = check.eval_samples(cfg)
    results = {size: evaluation(check.recipe, check.resolve(f"eval_batch_size={size}"), split,
                                check.splits[split], limit, num_workers=0, weights=check.trained())
               for size in (big, small)}
    no_draws(check, split, check.splits[split], limit, results[big], f"the first {limit} samples of {split}")
    differ = differences(results[big], results[small], tolerance_of(cfg))
    if differ:
        name, value, other = differ[0]
        salted = evaluation(check.recipe, check.resolve(f"eval_batch_size={big}"), split, check.splits[split], limit,
                            num_workers=0, salt=1, weights=check.trained())
        if differences(results[big], salted, tolerance_of(cfg)):  # its draws move it: they are per batch
            raise Failed(f"the {split} metric {name} is {value:.6g} with eval_batch_size={big} but {other:.6g} with "
                         f"{small}, and moves with the seeds of evaluation's draws: loss() or collate draws per "
                         f"batch in evaluation (from the global generators)", _PER_BATCH_FIX)
        raise Failed(f"the {split} metric {name} is {value:.6g} with eval_batch_size={big} but {other:.6g} with "
                     f"{small}: a count that is a per-batch mean or ratio, not a sum over samples",
                     "return sums from loss() (e.g. (pred == y).sum()) and turn them into ratios in metrics(totals)")
    return f"{split}: {', '.join(results[big])} agree with eval_batch_size {big} and {small}"
