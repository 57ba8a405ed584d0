"""What a run is made of, built alike by training and by testing a checkpoint (so that the same
weights give the same numbers): the recipe's splits, checked and cut to the config, and its model,
with its weights, EMA copy, activation checkpointing and compilation."""

import contextlib
import functools
import itertools

import torch
from accelerate.utils import set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from toolkit import UserError, distributed
from toolkit.data import libraries, mapstyle
from toolkit.optim import SCHEDULES
from toolkit.state.weights import load_weights


def build(recipe, cfg, processes, weights="", training=True, strict=False, use_ema=False):
    """The data and the model, built alike by `train` and `test` (so that the same weights give the
    same numbers), with one seed on every rank (so that data splits and initial weights agree
    everywhere). Returns (splits, model, the EMA model or None, the (missing, unexpected) names of
    `weights` or None).

    The model: the recipe's, with `weights` loaded (init_from, or a checkpoint's for `test`),
    channels_last, then, for training with ema.decay, its average, then compiled (except for
    `use_ema`: training validates its EMA weights uncompiled), its blocks' activations recomputed
    in backward for training with activation_checkpointing (the EMA is a copy from before: its
    forward saves nothing). For training, the splits are checked and cut (limit_batches,
    overfit_batches)."""
    splits = recipe_splits(recipe, cfg, processes)
    if training:
        check_splits(splits, cfg)
        splits = limit_splits(splits, cfg, processes.num_processes)
    same_everywhere(splits, processes)
    model = recipe.model(cfg)
    loaded = load_weights(model, weights, strict=strict, base=cfg.init_from) if weights else None
    if cfg.channels_last and distributed.keeps_memory_format():
        model = model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema.decay), use_buffers=True).to(
        processes.device) if training and cfg.ema.decay else None
    if training and cfg.activation_checkpointing:
        checkpoint_activations(model)
    if cfg.compile and not use_ema:
        model.compile()  # in place, so the weights keep their names: checkpoints do not depend on it
    return splits, model, ema, loaded


def recipe_splits(recipe, cfg, processes=None):
    """The recipe's splits as a run reads them: datasets() after set_seed(cfg.seed), on the main
    process first where there are several (`distributed.recipe_datasets`; `processes` None: this
    process alone), with the streams of libraries that read by index as map-style data."""
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    splits = recipe.datasets(cfg) if processes is None else distributed.recipe_datasets(recipe, cfg, processes)
    return libraries.by_index(splits)


def checkpoint_activations(model):
    """Recompute the activations of each of the model's blocks in backward instead of keeping them
    from forward: less memory for one more forward. A transformers or diffusers model (found
    outermost first) is told to, with its own `gradient_checkpointing_enable` or
    `enable_gradient_checkpointing`; any other model has each module of its outermost
    `nn.ModuleList`s and `nn.Sequential`s (its layers, stages or blocks) run through
    torch.utils.checkpoint. Both keep the RNG state of forward for the recompute, so dropout draws
    the same masks and the run gives the same numbers as without; BatchNorm's running statistics
    are updated once, in forward. The weights keep their names (checkpoints do not depend on it)."""
    def walk(module):
        if getattr(module, "supports_gradient_checkpointing", False):  # transformers (and peft's base)
            if callable(getattr(module, "activation_checkpointing_enable", None)):  # its name from transformers 5.x
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return 1
        if getattr(module, "_supports_gradient_checkpointing", False):  # diffusers
            module.enable_gradient_checkpointing()
            return 1
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            for block in module:
                block.forward = functools.partial(_checkpointed, block, block.forward)
            return len(module)
        return sum(walk(child) for child in module.children())

    if not walk(model):
        raise UserError(f"activation_checkpointing=true found no blocks in {type(model).__name__}: it recomputes each "
                        f"module of the model's nn.ModuleList or nn.Sequential layers, or calls a transformers or "
                        f"diffusers model's own gradient checkpointing; hold the layers in one of those, or set "
                        f"activation_checkpointing=false")


def _checkpointed(block, forward, *args, **kwargs):
    """`forward` of `block`, its activations recomputed in backward (non-reentrant, with forward's
    RNG state). Without gradients (evaluation), a plain forward."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs,
                                             context_fn=lambda: (contextlib.nullcontext(), _same_statistics(block)))


@contextlib.contextmanager
def _same_statistics(block):
    """The recompute leaves the running statistics of the block's BatchNorm layers as forward left
    them (a training-mode BatchNorm would otherwise update them twice a step)."""
    norms = [m for m in block.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.training]
    saved = [[buffer.clone() for buffer in norm.buffers()] for norm in norms]
    try:
        yield
    finally:
        for norm, buffers in zip(norms, saved):
            for buffer, value in zip(norm.buffers(), buffers):
                buffer.copy_(value)


def check_splits(splits, cfg):
    """What the recipe's datasets() returned fits the loop and the config (before any work)."""
    if not isinstance(splits, dict) or "train" not in splits:
        raise UserError(f"the recipe's datasets() must return a dict with a 'train' entry "
                        f"(and optionally 'val', 'test'), got {type(splits).__name__}"
                        + (f" with keys {', '.join(splits)}" if isinstance(splits, dict) else ""))
    unknown = set(splits) - {"train", "val", "test"}
    if unknown:
        raise UserError(f"the recipe's datasets() returned unknown splits {', '.join(sorted(unknown))}; "
                        f"expected train, val, test")
    train = splits["train"]
    if mapstyle.has_length(train) and len(train) == 0:
        raise UserError("the train split is empty")
    if not mapstyle.has_length(train):
        s, schedule = cfg.sched, SCHEDULES[cfg.sched.name]
        needs = [need for need, on in (
            (f"sched.name={s.name}", schedule.per_epoch or (schedule.over_training and not cfg.max_steps)),
            (f"sched.warmup_epochs={s.warmup_epochs}", s.warmup_epochs and not s.warmup_steps),
        ) if on]
        if needs:
            *others, last = [name for name, entry in SCHEDULES.items() if entry.over_training]
            raise UserError(f"{' and '.join(needs)} needs the length of an epoch, but the train split "
                            f"({type(train).__name__}) is a stream without one: set max_steps (with "
                            f"{', '.join(others)} or {last}), use sched.warmup_steps, or give the dataset a __len__")


def sizes(splits):
    """{split: its length, or None for a stream}."""
    return {split: len(ds) if mapstyle.has_length(ds) else None for split, ds in splits.items()}


def same_everywhere(splits, processes):
    """The recipe's datasets() gave every process the same splits, as far as their lengths tell (a
    tokenizer trained per process, or unseeded sampling, would give each its own data)."""
    if processes.num_processes == 1:
        return
    from accelerate.utils import gather_object

    seen = gather_object([sizes(splits)])
    if any(other != seen[0] for other in seen):
        raise UserError(f"the recipe's datasets() gave the processes different data: split lengths "
                        f"{'; '.join(f'rank {r}: {s}' for r, s in enumerate(seen))}; it must give the same data on "
                        f"every process (draw with cfg.seed, and build or train anything once, on every process alike)")


def limit_splits(splits, cfg, num_processes):
    """`limit_batches` and `debug.overfit_batches`: the first N batches' worth of samples (over all
    processes) of a split; overfitting trains and validates on the same ones. A stream is cut as
    it is read (see make_loader); to overfit, its first samples are kept in memory (and a pass
    over them is an epoch)."""
    def first(split, batches, batch_size):
        n = batches * batch_size * num_processes
        if mapstyle.is_stream(splits[split]):
            return list(itertools.islice(splits[split], n))
        return torch.utils.data.Subset(splits[split], range(min(n, len(splits[split]))))

    limited = dict(splits)
    for split, batches in cfg.limit_batches.items():
        if batches and split in splits and not mapstyle.is_stream(splits[split]):
            limited[split] = first(split, batches, cfg.batch_size if split == "train" else cfg.eval_batch_size)
    if cfg.debug.overfit_batches:
        few = limited["val"] = first("train", cfg.debug.overfit_batches, cfg.batch_size)
        # Repeated to the length of a real epoch: the real run's steps and LR schedule (a decay to
        # zero after a few steps would stop short of memorising them).
        limited["train"] = few if isinstance(few, list) else \
            torch.utils.data.Subset(few, [i % len(few) for i in range(len(limited["train"]))])
    return limited
