"""The properties measured with short training runs of the recipe, in the check's temporary folder:
learns, resume, input. Each property returns what it measured, or raises `Failed` with the fix."""

import json
import math
import os
import shutil
import statistics
from pathlib import Path

import torch

from toolkit.check.rows import Failed, Skipped
from toolkit.check.work import LEARNING, evaluation, finished, first
from toolkit.state import checkpoint, weights

LEARN_FALL = 0.05  # the loss of the batches trained on must fall by this fraction


def learns(check):
    """A model that learns fits the few batches it is trained on: their loss, on the same inputs
    (the same draws of dropout and augmentation) before and after, falls clearly. One that does
    not train leaves it as it was."""
    summary = finished(check.learned())
    before, after = (fitted(check, weights) for weights in ("", check.trained()))
    share = (before["loss"] - after["loss"]) / abs(before["loss"]) if before["loss"] else 0.0
    what = (f"the loss of the {before['samples']:g} train samples it trained on went from {before['loss']:.4g} to "
            f"{after['loss']:.4g} in {summary.steps} steps (constant LR {check.cfg.optim.lr:g}"
            + (f", {check.launched()}" if check.launcher else "") + "): ")
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


RESUME_BATCHES = 4  # train batches per epoch of the resume check's two epochs


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
    one, other = (whole_weights(check, checkpoint.find(run)) for run in (check.unbroken, stopped))
    differ = [name for name in one if not torch.equal(one[name], other.get(name, torch.empty(0)))]
    what = (f"{total} steps unbroken against {stop} steps, a stop, a resume and {total - stop} more "
            f"(num_workers={cfg.num_workers}" + (f", {check.launched()}" if check.launcher else "") + ")")
    if differ:
        worst = max(differ, key=lambda name: _difference(one[name], other.get(name)))
        raise Failed(f"{what}: {len(differ)} of {len(one)} weight tensors differ (most: {worst}, by "
                     f"{_difference(one[worst], other.get(worst)):.3g})",
                     "what the training step depends on must be in the checkpoint: keep it in parameters or buffers "
                     "(register_buffer), not in Python attributes or globals (a step counter); draw randomness from "
                     "torch's global generator (saved and restored), not from a generator of your own"
                     + ("; on GPUs set deterministic=true" if torch.cuda.is_available() else ""))
    return f"{what}: all {len(one)} weight tensors equal, bit for bit"


def whole_weights(check, folder):
    """The whole weights of a checkpoint, whatever wrote it (one process, or shards of a strategy):
    loaded into the recipe's model, built as a run builds it."""
    from accelerate.utils import set_seed

    set_seed(check.cfg.seed)
    model = check.recipe.model(check.cfg)
    weights.load_weights(model, folder, strict=True, base=check.cfg.init_from)
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def _difference(one, other):
    if other is None or one.shape != other.shape:
        return math.inf
    return (one.double() - other.double()).abs().max().item()


INPUT_BOUND = 0.5  # a step that waits for data more than this fraction of its time


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


def records(run_dir):
    """The rows of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
