"""Evaluation: exact metrics of a model over a split (`evaluate`), the validations of a training
run with its best checkpoint, early stopping and a search's pruning (`Validator`), and the
evaluation of a saved checkpoint (`test`, for `launch.py test`)."""

import itertools
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, send_to_device

from toolkit import UserError, build, distributed
from toolkit.data import loaders, mapstyle
from toolkit.metrics import Totals, summarize
from toolkit.run import rundir
from toolkit.run.logs import format_metrics, log
from toolkit.run.summary import Stop
from toolkit.state import checkpoint


@torch.no_grad()
def evaluate(accelerator, model, loader, recipe, cfg, split, beat=lambda: None, training=False):
    """Exact metrics of `model` over `loader`'s whole split, summed over all ranks; in training
    mode (batch statistics, dropout) if `training`, as `launch.py check` measures what a few steps fit.

    Ranks may hold different numbers of batches (the split is not padded): the model is the one
    `distributed.evaluation_model` gives, each rank runs the forwards that `lockstep` asks for,
    and the counts' collective is the final reduce.
    """
    net = distributed.evaluation_model(accelerator, model)
    was_training = net.training
    net.train(training)
    totals = Totals(cfg.loss_per or "samples")
    with accelerator.autocast():  # the same precision for the EMA copy as for the prepared model
        for batch, counted in distributed.lockstep(accelerator, loader):
            loss, counts = recipe.loss(net, batch, cfg)
            if counted:  # else a repeat, that sharded weights need from every rank
                totals.add(loss, counts)
            beat()  # progress, for the watchdog
    net.train(was_training)
    sums = totals.reduce(accelerator)
    if not sums.get("samples"):  # the same sums on every rank: all stop here together
        stream = not mapstyle.has_length(loader)  # a list of batches has a length too (sanity_check)
        raise UserError(f"the {split} split has no sample" + (" (its stream yielded nothing)" if stream else ""))
    return summarize(sums, recipe.metrics, cfg.loss_per or "samples")


def monitor_for(cfg, has_val, has_ema):
    """checkpoint.monitor where the run can measure it (a val split; an EMA for val_ema/), else ""."""
    monitor = cfg.checkpoint.monitor
    return monitor if has_val and (has_ema or not monitor.startswith("val_ema/")) else ""


def monitored(metrics, monitor):
    """The value of `monitor` (e.g. "val/accuracy") in the latest validation's `metrics` ({split: metrics})."""
    split, name = monitor.split("/", 1)
    if name not in metrics[split]:
        raise UserError(f"checkpoint.monitor={monitor}: validation reports {', '.join(metrics[split])}")
    return metrics[split][name]


class Validator:
    """Validates the model and its EMA (`models`: split name -> model or None) on the val split,
    logs their metrics, and, with a monitor, decides on rank 0 for every rank whether this is the
    best so far, and whether to stop: early_stop, or the `trial` hook (a search pruning this trial)."""

    def __init__(self, accelerator, recipe, cfg, loader, models, run, trial=None, beat=lambda: None):
        self.accelerator, self.recipe, self.cfg, self.loader, self.run = accelerator, recipe, cfg, loader, run
        self.models = {split: net for split, net in models.items() if net is not None}
        self.trial, self.beat = trial, beat  # beat: each evaluation batch is progress (Watchdog)

    def sanity_check(self, val):
        """Evaluate the first `sanity_val_batches` batches of the val split `val` before the first
        step, as a validation would, so that a loss or metrics() that fails on val batches, or a
        checkpoint.monitor that validation does not report, ends the run in seconds rather than
        after an epoch. Every rank evaluates the same batches; nothing is logged or kept, and no
        generator of the training step moves (a resumed run stays exact)."""
        cfg, accelerator = self.cfg, self.accelerator
        n = cfg.sanity_val_batches * cfg.eval_batch_size
        if self.loader is None or not n:
            return
        first = list(itertools.islice(val, n)) if mapstyle.is_stream(val) else \
            torch.utils.data.Subset(val, range(min(n, len(val))))
        with mapstyle.untouched_randomness(accelerator.device):
            loader = loaders.make_loader("val", first, cfg, self.recipe, accelerator, num_workers=0)
            batches = [send_to_device(batch, accelerator.device) for batch in loader]
            reported = {split: evaluate(accelerator, net, batches, self.recipe, cfg, "val", self.beat)
                        for split, net in self.models.items()}
        if self.run.monitor:
            monitored(reported, self.run.monitor)

    def __call__(self, state, epoch):
        """Returns (whether it is the best so far, the `Stop` it asks for or None)."""
        if self.loader is None:
            return False, None
        cfg, metrics, monitor = self.cfg, self.run.summary.metrics, self.run.monitor
        for split, net in self.models.items():
            metrics[split] = evaluate(self.accelerator, net, self.loader, self.recipe, cfg, "val", self.beat)
            self.run.metrics.log(split, metrics[split], state.step, epoch)
            log.info(f"epoch {epoch}/{cfg.epochs} step {state.step} {split} {format_metrics(metrics[split])}")
        if not monitor:
            return False, None
        value = monitored(metrics, monitor)
        state.validations += 1
        # Rank 0 decides for all: the collectives that follow (a save, stopping) must match.
        main = self.accelerator.is_main_process
        pruned = bool(main and self.trial is not None and self.trial.report(value, state.validations))
        best, pruned = broadcast_object_list([state.improves(value, cfg.checkpoint.mode), pruned])
        state.best = value if best else state.best
        state.stale_validations = 0 if best else state.stale_validations + 1
        early = bool(cfg.early_stop.patience) and state.stale_validations >= cfg.early_stop.patience
        return best, Stop.EARLY_STOP if early else Stop.PRUNED if pruned else None


def test(recipe, cfg, run_dir, which="", split="", use_ema=False):
    """Evaluate checkpoint `which` (best, latest or a folder name; default: best if the run has
    one, else latest) of the run in `run_dir` on `split` (default: test, else val), with its EMA
    weights if `use_ema`; print the metrics and save them as <run>/<split>[_ema]-<checkpoint>.json."""
    processes, cpu = distributed.start_processes(cfg)
    which = which or ("best" if checkpoint.read_state(checkpoint.find(run_dir)).best_checkpoint else "latest")
    path = checkpoint.find(run_dir, which)
    weights = checkpoint.weights_of(path, use_ema)
    splits, model, _, _ = build.build(recipe, cfg, processes, weights, training=False, strict=True, use_ema=use_ema)
    split = split or ("test" if "test" in splits else "val")
    if split not in splits:
        raise UserError(f"the recipe has no {split!r} split; it has {', '.join(splits)}")
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.precision)
    model = accelerator.prepare(model)
    loader = loaders.make_loader(split, splits[split], cfg, recipe, processes).prepare(accelerator, training=False)
    metrics = evaluate(accelerator, model, loader, recipe, cfg, split)
    name = f"{split}_ema" if use_ema else split
    result = {"run_dir": str(run_dir), "checkpoint": path.name, "step": checkpoint.read_state(path).step,
              "split": name, name: metrics}
    if accelerator.is_main_process:
        rundir.write_json(Path(run_dir) / f"{name}-{path.name}.json", result)
        print(f"{name} {format_metrics(metrics, digits=6)} | checkpoint {which} ({path.name}) | run {run_dir}")
    del model
    accelerator.free_memory()
    accelerator.end_training()
    return result
