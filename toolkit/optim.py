"""The optimizer (parameter groups, freezing, LR multipliers), the learning-rate schedule, and the
weighing of each step's gradients (`StepUnits`: exact gradients for a loss that is a mean over a
count, such as tokens).

The schedule is a plain function of the optimizer step, applied before every optimizer step:
nothing to prepare (Accelerate's prepared schedulers step once per process), nothing to save (the
step is in the checkpoint), and the same trace whatever the number of processes.
"""

import dataclasses
import math
from collections.abc import Callable

import torch

from toolkit import UserError, distributed
from toolkit.metrics import check_counts, exact_dtype

# Every optim.name: the torch optimizer, from the parameter groups and cfg.optim.
OPTIMIZERS = {
    "adamw": lambda groups, o: torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas)),
    "adam": lambda groups, o: torch.optim.Adam(groups, lr=o.lr, betas=tuple(o.betas)),
    "sgd": lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum),
}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One sched.name: the LR factor after warmup, and what it needs to know."""
    # (step, progress, cfg.sched, steps_per_epoch) -> the factor, from 1 down; progress goes from 0 to 1
    # over the steps after warmup (None for a stream without max_steps: only for schedules not over_training)
    shape: Callable
    over_training: bool = False  # its shape spans the training's length: a stream needs max_steps, and a
    # resume that changes epochs or max_steps moves it
    per_epoch: bool = False  # it counts in epochs (steps_per_epoch): a stream, which has none, cannot use it
    floored: bool = False  # it ends at sched.min_lr x lr instead of 0
    warmup: float = 0.0  # the warmup, as a fraction of training, when sched.warmup_* are 0
    start: float = 0.0  # the factor that warmup starts from


def _cosine(step, progress, s, per_epoch):
    return 0.5 * (1 + math.cos(math.pi * progress))


# Every sched.name.
SCHEDULES = {
    "constant": Schedule(lambda step, progress, s, per_epoch: 1.0),
    "cosine": Schedule(_cosine, over_training=True, floored=True),
    "linear": Schedule(lambda step, progress, s, per_epoch: 1 - progress, over_training=True, floored=True),
    "step": Schedule(lambda step, progress, s, per_epoch: s.gamma ** (step // max(1, round(s.step_epochs * per_epoch))),
                     per_epoch=True),
    # Warms up for 30% of training unless told otherwise, from LR/25, then anneals by a cosine to about 0.
    "onecycle": Schedule(_cosine, over_training=True, warmup=0.3, start=1 / 25),
    # From LR to gamma x LR, by the same factor every step: a decay (gamma < 1), or lr-find's range.
    "exponential": Schedule(lambda step, progress, s, per_epoch: s.gamma ** progress, over_training=True),
}


def make_optimizer(cfg, model, recipe):
    """The recipe's `optimizer(cfg, model)` if it has one, else `optim.*` from the config.

    Parameters whose name starts with a `freeze` prefix are frozen. Each other parameter gets the
    LR multiplier of the longest `optim.lr_mult` prefix it matches; weight decay applies to
    matrices and kernels only (not to biases or normalisation weights: anything 1-D).
    Returns (optimizer, lines describing the groups for the log)."""
    names = [name for name, _ in model.named_parameters()]
    unknown = [prefix for prefix in (*cfg.freeze, *cfg.optim.lr_mult) if not any(_matches(n, [prefix]) for n in names)]
    if unknown:
        raise UserError(f"no parameter of the model starts with {', '.join(map(repr, unknown))} "
                        f"(freeze / optim.lr_mult); its top-level modules are "
                        f"{', '.join(name for name, _ in model.named_children())}")
    frozen = [name for name in names if _matches(name, cfg.freeze)]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if recipe.optimizer is not None:
        return recipe.optimizer(cfg, model), [f"the recipe's optimizer(); frozen: {len(frozen)} tensors"]

    o = cfg.optim
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefixes = [prefix for prefix in o.lr_mult if _matches(name, [prefix])]
        mult = o.lr_mult[max(prefixes, key=len)] if prefixes else 1.0
        decay = o.weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((mult, decay), []).append(p)
    if not groups:
        raise UserError("the model has no trainable parameters (check `freeze`)")
    param_groups = [{"params": ps, "lr": o.lr * mult, "weight_decay": decay} for (mult, decay), ps in groups.items()]
    optimizer = OPTIMIZERS[o.name](param_groups, o)
    lines = [f"{o.name}: group {i}: lr {g['lr']:.3g}, weight_decay {g['weight_decay']:.3g}: "
             f"{len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} parameters"
             for i, g in enumerate(param_groups)]
    if frozen:
        lines.append(f"frozen: {len(frozen)} tensors, "
                     f"{sum(p.numel() for n, p in model.named_parameters() if n in frozen):,} parameters")
    return optimizer, lines


def _matches(name, prefixes):
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def lr_schedule(cfg, steps_per_epoch):
    """factor(step) -> the multiplier of each group's base LR at optimizer step `step` (0-based).
    `steps_per_epoch` is None for a stream, with which only max_steps gives the training length.

    Warmup rises linearly (from the schedule's `start`, else 0) over `sched.warmup_steps` (or
    `warmup_epochs`, or the schedule's own fraction of training); then the schedule's shape, which
    ends at `sched.min_lr` x the LR where it is `floored`."""
    s = cfg.sched
    schedule = SCHEDULES[s.name]
    total = steps_per_epoch * cfg.epochs if steps_per_epoch else None  # None: a stream (see build.check_splits)
    if cfg.max_steps:
        total = min(total or cfg.max_steps, cfg.max_steps)
    warmup = s.warmup_steps or round(s.warmup_epochs * (steps_per_epoch or 0)) or round(schedule.warmup * (total or 0))
    floor = s.min_lr if schedule.floored else 0.0

    def factor(step):
        if step < warmup:
            return schedule.start + (1 - schedule.start) * step / warmup
        progress = None if total is None else min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * schedule.shape(step, progress, s, steps_per_epoch)

    return factor


def set_lr(optimizer, base_lrs, factor):
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor


class StepUnits:
    """Makes an optimizer step's gradient the gradient of the one big batch it stands for.

    DDP averages the processes' gradients and Accelerate divides each micro-batch's loss by
    `grad_accum`: a mean of per-micro-batch means. That is exact only when every micro-batch
    holds as many units as the others. With `loss_per=tokens` (a loss that is a mean over a
    count), each micro-batch's loss is weighed by its count instead, and at the step the
    gradients are divided by the step's total count over micro-batches and processes (one
    all-reduce of a number, no host sync): the gradient of the summed loss over all tokens of the
    step, divided by their number.

    A stream's last steps (`StreamLoader`) can leave some processes without a batch: they
    repeat their last one with weight zero, and the others' losses are weighed so that the
    step's gradient is the mean over the processes that had data.

    A step of one micro-batch on one process is its own big batch: its loss is used as it is.

    Where the strategy steps inside backward (`distributed.steps_in_backward`), the step's count is
    summed before backward instead (a step is one micro-batch there).
    """

    def __init__(self, per, accelerator, loader):
        """`loader`: the training `loaders.Loader`, which says which batches are padding."""
        self.per, self.accelerator, self.loader = per, accelerator, loader
        self.units = torch.zeros((), dtype=exact_dtype(accelerator.device), device=accelerator.device)
        self.alone = accelerator.num_processes == 1 and accelerator.gradient_accumulation_steps == 1
        self.before_backward = distributed.steps_in_backward(accelerator)

    def weigh(self, loss, counts):
        """The loss to back-propagate for one micro-batch."""
        if self.per:
            if self.per not in counts:
                check_counts(counts, self.per)
            if self.alone:  # no other micro-batch or process to weigh it against
                return loss
            units = 0 if self.loader.padding else counts[self.per]
            self.units += units
            if self.before_backward:  # the step's units, over the processes: factor as in `normalize`
                total = self.accelerator.reduce(self.units, reduction="sum")
                weight = torch.where(total > 0, self.units * self.accelerator.num_processes / total, 0.0)
                self.units.zero_()
                return loss * weight
            return loss * units
        if self.loader.padding:  # a repeat that must not count
            return loss * 0
        with_data = self.loader.ranks_with_data
        if with_data != self.accelerator.num_processes:
            return loss * (self.accelerator.num_processes / with_data)
        return loss

    def normalize(self, model):
        """At an optimizer step, before clipping: divide the gradients by the step's units."""
        if not self.per or self.alone or self.before_backward:
            return
        total = self.accelerator.reduce(self.units, reduction="sum") if self.accelerator.num_processes > 1 \
            else self.units
        factor = self.accelerator.gradient_accumulation_steps * self.accelerator.num_processes / total
        factor = torch.where(total > 0, factor, 0.0)  # a step without units has zero gradients anyway
        distributed.scale_gradients(model, factor)
        self.units.zero_()
