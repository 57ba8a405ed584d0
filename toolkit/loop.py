"""The training loop. Read `train` top to bottom: build, prepare, train, evaluate, log.

Accelerate does device placement, DDP, mixed precision and gradient accumulation; everything else
is plain PyTorch. Performance rules kept here: the loss and metric counts stay on the device and
are read every `log_every` steps (with `skip_nonfinite`, also one flag per optimizer step); no
barrier in the hot loop; gradients freed with set_to_none.
"""

import functools
import importlib
import itertools
import math
import os
import shlex
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import accelerate
import accelerate.optimizer
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DataLoaderConfiguration, DistributedType, broadcast, broadcast_object_list,
                               parse_flag_from_env, set_seed)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from toolkit import PeerFailure, UserError, checkpoint, config, data, search, tracking
from toolkit.metrics import StepUnits, Totals, summarize
from toolkit.notify import notify
from toolkit.optim import lr_schedule, make_optimizer, set_lr
from toolkit.signals import StopRequest
from toolkit.tracking import FILE_ONLY, format_metrics, log

# Accelerate's optimizer step looks up whether the `lomo_optim` package is installed, twice per
# step, through importlib (about 0.1 ms each: 7% of a LeNet step on a CPU). The answer cannot
# change while the process runs.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def train(recipe, cfg, resume=None, autoresume=False):
    """Train `recipe` with the resolved `cfg` in a new run folder, or, given `resume` (a run
    folder), continue that run from its latest checkpoint. Return the summary. With `autoresume`
    the new run's folder is <output_dir>/<recipe>/<name> (launch.py --autoresume)."""
    # Creating the first optimizer imports torch._dynamo (0.8 s on 2 CPU cores): let that happen
    # while the data loads, which mostly waits in zlib and torch, outside the GIL.
    threading.Thread(target=importlib.import_module, args=("torch._dynamo",), daemon=True).start()
    # The process group first, so that ranks can agree on things (the run folder) before any work.
    processes, cpu = start_processes(cfg)
    tracking.check_trackers(cfg)
    resume_from = checkpoint.find(resume) if resume else None
    state = checkpoint.verify(resume_from, processes.num_processes) if resume else checkpoint.TrainState()

    # Build with one seed on every rank, so that data splits and initial weights agree everywhere.
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    with processes.main_process_first():  # the main process downloads; the others then read its files
        splits = recipe.datasets(cfg)
    check_splits(splits, cfg)
    splits = limit_splits(splits, cfg, processes.num_processes)
    model, ema, initialized = build_model(recipe, cfg, weights="" if resume else cfg.init_from, ema=True)
    optimizer, groups = make_optimizer(cfg, model, recipe)
    loaders = {split: make_loader(split, ds, cfg, recipe, processes) for split, ds in splits.items()}
    # From here on each rank draws its own randomness (augmentation, dropout).
    set_seed(cfg.seed + processes.process_index)

    run_dir = Path(resume) if resume else tracking.create_run_dir(processes, cfg.output_dir, recipe.name, cfg.name,
                                                                   autoresume)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=tracking.make_trackers(cfg, run_dir, state) or None,
        project_dir=run_dir,
        # All ranks shuffle with the same seed, then each takes its own shard of every batch list:
        # the data order depends only on `seed` and the epoch. Batches from pinned memory are
        # copied to the GPU without blocking.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                  non_blocking=processes.device.type == "cuda"),
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    train_loader = prepare_loader(accelerator, loaders.pop("train"), training=True)
    eval_loaders = {split: prepare_loader(accelerator, loader, training=False) for split, loader in loaders.items()}
    if ema is not None:
        ema.to(accelerator.device)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    lr_factor = lr_schedule(cfg, steps_per_epoch=steps_per_epoch(train_loader, cfg))
    units = StepUnits(cfg.loss_per, accelerator, train_loader)  # exact gradients for a loss per token
    if resume_from:
        # Before anything in the run folder changes: a resume that fails leaves the run as it was.
        checkpoint.load(accelerator, resume_from, ema)

    if accelerator.is_main_process:
        tracking.write_run_files(run_dir, cfg, None if resume else recipe.path)
    tracking.setup_logging(run_dir, accelerator.is_main_process)
    metrics_log = tracking.Metrics(accelerator, run_dir, state.metrics_lines if resume else None)
    trial = search.Reporter(accelerator, run_dir)  # a search's trial reports validations to its study
    log_header(accelerator, recipe, cfg, splits, accelerator.unwrap_model(model), run_dir, groups)
    summary = {"status": "running", "recipe": recipe.name, "run_dir": str(run_dir), "epochs": state.epoch,
               "steps": state.step, "host": socket.gethostname(), "pid": os.getpid()}
    if accelerator.is_main_process:
        tracking.write_summary(run_dir, summary)  # `launch.py runs` shows it as running
    if initialized:
        log.info(f"init_from {cfg.init_from}: missing keys {initialized[0] or 'none'}, "
                 f"unexpected keys {initialized[1] or 'none'}")
    if resume_from:
        log.info(f"resumed from {resume_from} (epoch {state.epoch}, batch {state.batch}, step {state.step})")
        if state.num_processes != accelerator.num_processes:
            log.warning(f"the checkpoint was written by {state.num_processes} process(es), this run has "
                        f"{accelerator.num_processes}: the data shards differ, so the run continues but not "
                        f"exactly as it would have")

    ckpt = cfg.checkpoint
    monitor = ckpt.monitor if "val" in eval_loaders and (ema or not ckpt.monitor.startswith("val_ema/")) else ""
    stop = StopRequest(accelerator.num_processes)
    session_start = time.time() - state.wall_time_s
    state.num_processes = accelerator.num_processes
    check_finite = cfg.skip_nonfinite
    per = cfg.loss_per or "samples"  # what the loss is a mean over
    # Model FLOPs utilisation, on GPUs whose peak is known, for recipes that count their FLOPs.
    flops_per_unit = recipe.flops(cfg, accelerator.unwrap_model(model)) if hasattr(recipe, "flops") else 0
    peak_flops = peak_flops_per_s(accelerator.device, accelerator.mixed_precision)
    window, window_start = Totals(per), time.perf_counter()
    steps = StepStats(accelerator.device)  # grad norms and skipped steps of the window

    def log_train(epoch, bar):
        """Read the train window's sums (the host sync), log them and start the next window."""
        nonlocal window_start
        sums = window.reduce(accelerator)
        seconds = time.perf_counter() - window_start
        metrics = summarize(sums, getattr(recipe, "metrics", None), per)
        metrics.update(steps.read(), lr=optimizer.param_groups[0]["lr"], samples_per_s=sums.get("samples", 0) / seconds)
        if per != "samples":
            metrics[f"{per}_per_s"] = sums.get(per, 0) / seconds
            if flops_per_unit and peak_flops:
                metrics["mfu"] = flops_per_unit * metrics[f"{per}_per_s"] / peak_flops
        metrics_log.log("train", metrics, state.step, epoch)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_per_s=f"{metrics['samples_per_s']:.0f}")
        log.info(f"epoch {epoch} step {state.step} train {format_metrics(metrics)}",
                 extra=FILE_ONLY if not bar.disable else None)  # the bar shows it on a terminal
        window_start = time.perf_counter()

    def save(best=False):
        nonlocal window_start
        state.wall_time_s = round(time.time() - session_start, 2)
        state.metrics_lines = metrics_log.lines
        path = checkpoint.save(accelerator, run_dir, state, ckpt.keep, best, model, ema)
        log.info(f"saved {path}" + (f" (best {monitor}={state.best:.6g})" if best else ""), extra=FILE_ONLY)
        window_start = time.perf_counter()  # samples/s counts training time only

    def validate(epoch):
        """Validate (the EMA weights too), log, and decide on rank 0 for all: (is it the best so
        far, the reason to stop early or None)."""
        nonlocal window_start
        for split, net in (("val", model), ("val_ema", ema)):
            if net is not None:
                summary[split] = evaluate(accelerator, net, eval_loaders["val"], recipe, cfg, "val")
                metrics_log.log(split, summary[split], state.step, epoch)
                log.info(f"epoch {epoch}/{cfg.epochs} step {state.step} {split} {format_metrics(summary[split])}")
        window_start = time.perf_counter()
        if not monitor:
            return False, None
        value = monitored(summary, monitor)
        # Rank 0 decides for all: the collectives that follow (a save, stopping) must match.
        best = broadcast_object_list([state.improves(value, ckpt.mode)])[0]
        state.best = value if best else state.best
        state.stale_validations = 0 if best else state.stale_validations + 1
        pruned = trial.report(value)  # "pruned" when a search stops this trial, else None
        early = bool(cfg.early_stop.patience) and state.stale_validations >= cfg.early_stop.patience
        return best, "early_stop" if early else pruned

    try:
        stopping = None  # why training ends before `epochs`: max_steps, max_minutes, early_stop, a signal, nan, pruned
        finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
        last_epoch = state.epoch if cfg.max_steps and state.step >= cfg.max_steps else cfg.epochs
        for epoch in range(state.epoch + 1, last_epoch + 1):
            model.train()
            data.set_epoch(train_loader, epoch - 1)  # order and augmentation: functions of (seed, epoch)
            batches = skip_first_batches(train_loader, state.batch)
            length = len(train_loader) if data.has_length(train_loader) else None  # a stream has none
            bar = tracking.progress_bar(accelerator, length, state.batch, f"epoch {epoch}/{cfg.epochs}")
            end_of_epoch = state.batch == length
            for batch in batches:
                with accelerator.accumulate(model):  # no DDP all-reduce until the last micro-batch
                    loss, counts = recipe.loss(model, batch, cfg)
                    accelerator.backward(units.weigh(loss, counts))  # exact weights: see StepUnits
                    if check_finite:
                        finite &= torch.isfinite(loss.detach())
                    if accelerator.sync_gradients:
                        units.normalize(model)  # with loss_per: divide by the step's tokens
                        grad_norm = None  # measured when needed, and for the log on its steps
                        if cfg.clip_grad_norm or check_finite or (state.step + 1) % cfg.log_every == 0:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm or math.inf)
                        # Gradients are all-reduced, so every rank sees the same norm; the loss is
                        # per rank, so the flag is all-reduced too: all ranks skip, or none.
                        good = not check_finite or all_finite(accelerator, finite, grad_norm, cfg.precision)
                        if good:
                            set_lr(optimizer, base_lrs, lr_factor(state.step))
                            optimizer.step()
                        updated = good and not optimizer.step_was_skipped  # fp16's scaler skips some
                        optimizer.zero_grad(set_to_none=True)
                if not units.padding:  # a stream's rank that ran out repeats its last batch, weighed 0
                    window.add(loss, counts)
                state.batch += 1
                bar.update()
                end_of_epoch = batches.end_of_dataloader
                if not accelerator.sync_gradients:
                    continue  # micro-batches of one optimizer step; everything below is per step

                state.step += 1
                steps.add(grad_norm, updated)
                if ema is not None and updated:
                    ema.update_parameters(accelerator.unwrap_model(model))
                state.bad_steps = 0 if good else state.bad_steps + 1
                if not good:
                    finite.fill_(True)
                    log.warning(f"step {state.step}: non-finite loss or gradient norm; step skipped "
                                f"({state.bad_steps} in a row, nan_tolerance={cfg.nan_tolerance})")

                over_time = cfg.max_minutes and time.time() - session_start > 60 * cfg.max_minutes
                stopping = (stop.check("max_minutes" if over_time else None)
                            or ("max_steps" if state.step == cfg.max_steps else None)
                            or ("nan" if state.bad_steps > cfg.nan_tolerance else None))
                validate_now = not end_of_epoch and cfg.val_every_steps and state.step % cfg.val_every_steps == 0
                save_now = not end_of_epoch and (stopping or (ckpt.every_steps and state.step % ckpt.every_steps == 0))
                if state.step % cfg.log_every == 0 or end_of_epoch or save_now or validate_now:
                    log_train(epoch, bar)
                if validate_now and "val" in eval_loaders:
                    best, reason = validate(epoch)
                    stopping = stopping or reason
                    save_now = save_now or best or bool(stopping)
                    model.train()
                else:
                    best = False
                if save_now:
                    save(best)
                if stopping:
                    break
            bar.close()
            if not end_of_epoch:  # stopped mid-epoch, saved above
                break
            state.epoch, state.batch = epoch, 0
            summary.update(epochs=epoch, steps=state.step)

            best = False
            last = epoch == cfg.epochs or stopping in ("max_steps", "max_minutes")
            if "val" in eval_loaders and ((cfg.val_every and epoch % cfg.val_every == 0) or last):
                best, reason = validate(epoch)
                stopping = stopping or reason
            scheduled = (ckpt.every_epochs and epoch % ckpt.every_epochs == 0) or (
                ckpt.every_steps and state.step % ckpt.every_steps == 0)
            if best or scheduled or stopping or last:
                save(best)
            if stopping:
                break

        stop.finish()
        summary.update(epochs=state.epoch, steps=state.step)
        if stopping == "nan":
            summary.update(status="failed", error=(
                f"{state.bad_steps} optimizer steps in a row had a non-finite loss or gradient norm (more than "
                f"nan_tolerance={cfg.nan_tolerance}); they were skipped and the last good state is saved in "
                f"{checkpoint.find(run_dir)}"))
        elif stopping in ("SIGTERM", "SIGINT"):
            summary.update(status="interrupted", signal=stopping)
            log.info(f"stopped by {stopping} at step {state.step}; continue with: python launch.py resume {run_dir}")
        elif stopping == "pruned":  # ends cleanly, without testing: the search has no use for it
            summary["status"] = "pruned"
            log.info(f"pruned by the search at step {state.step}")
        else:
            if stopping:
                log.info(f"stopped at step {state.step}: {stopping}")
            if "test" in eval_loaders:
                summary["test"] = evaluate(accelerator, model, eval_loaders["test"], recipe, cfg, "test")
                metrics_log.log("test", summary["test"], state.step, state.epoch)
            if cfg.debug.fast_run:
                checkpoint.load(accelerator, checkpoint.find(run_dir), ema)
                log.info("fast_run: one train, val and test step done, a checkpoint saved and loaded back")
            summary["status"] = "finished"
    except BaseException as e:
        summary["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        summary["error"] = f"{type(e).__name__}: {e}"
        if accelerator.num_processes > 1 and lost_a_peer(e):
            # The process that failed first wrote its error (below) before it exited, which is
            # what broke this collective.
            causes = [p.read_text().strip().splitlines()[-1] for p in sorted(run_dir.glob("error-rank*.txt"))]
            summary["error"] = f"another process failed: {'; '.join(causes) or 'see its error'}"
            raise PeerFailure(f"rank {accelerator.process_index} stopped: another process failed "
                              f"({', '.join(p.split(':')[0] for p in causes) or 'see its error above'})") from e
        if accelerator.num_processes > 1 and not isinstance(e, KeyboardInterrupt):
            (run_dir / f"error-rank{accelerator.process_index}.txt").write_text(
                "".join(traceback.format_exception(e)).rstrip() + f"\nrank {accelerator.process_index}: "
                f"{type(e).__name__}: {e}\n", encoding="utf-8")
        raise
    finally:
        stop.close()
        summary.update(epochs=state.epoch, steps=state.step, wall_time_s=round(time.time() - session_start, 2))
        if state.best is not None:
            summary["best"] = {"monitor": monitor, "value": state.best, "checkpoint": state.best_checkpoint}
        if accelerator.is_main_process:
            tracking.write_summary(run_dir, summary)
            notify(cfg, summary)
        log.info(tracking.result_line(summary), extra=FILE_ONLY)  # log.txt's last line, whatever happened
        metrics_log.close()
        tracking.close_logging()
    if summary["status"] == "finished" and accelerator.is_main_process:  # once, not once per machine
        print(tracking.result_line(summary))
    # Drop the DDP model before its process group: the other way round, gloo processes abort at
    # exit ("terminate called without an active exception").
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()  # finishes the trackers and ends the process group
    return summary


def test(recipe, cfg, run_dir, which="", split="", use_ema=False):
    """Evaluate checkpoint `which` (best, latest or a folder name; default: best if the run has
    one, else latest) of the run in `run_dir` on `split` (default: test, else val), with its EMA
    weights if `use_ema`; print the metrics and save them as <run>/<split>[_ema]-<checkpoint>.json."""
    processes, cpu = start_processes(cfg)
    which = which or ("best" if checkpoint.read_state(checkpoint.find(run_dir)).best_checkpoint else "latest")
    path = checkpoint.find(run_dir, which)
    weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
    if not weights.is_file():
        raise UserError(f"{path} has no {weights.name}" + (" (the run had no EMA: ema.decay=0)" if use_ema else ""))
    set_seed(cfg.seed)
    with processes.main_process_first():
        splits = recipe.datasets(cfg)
    split = split or ("test" if "test" in splits else "val")
    if split not in splits:
        raise UserError(f"the recipe has no {split!r} split; it has {', '.join(splits)}")
    # As training built it (channels_last, compiled), so the same weights give the same numbers; the
    # EMA weights as training validated them, uncompiled.
    model, _, _ = build_model(recipe, cfg, weights, strict=True, compile=not use_ema)
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.precision)
    model = accelerator.prepare(model)
    loader = prepare_loader(accelerator, make_loader(split, splits[split], cfg, recipe, processes), training=False)
    metrics = evaluate(accelerator, model, loader, recipe, cfg, split)
    name = f"{split}_ema" if use_ema else split
    result = {"run_dir": str(run_dir), "checkpoint": path.name, "step": checkpoint.read_state(path).step,
              "split": name, name: metrics}
    if accelerator.is_main_process:
        tracking.write_json(Path(run_dir) / f"{name}-{path.name}.json", result)
        print(f"{name} {format_metrics(metrics)} | checkpoint {which} ({path.name}) | run {run_dir}")
    del model
    accelerator.free_memory()
    accelerator.end_training()
    return result


def lost_a_peer(error):
    """Whether `error` is a collective that failed because another process went away."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                  "NCCL communicator was aborted", "remote process exited"))


def monitored(summary, monitor):
    """The value of `monitor` (e.g. "val/accuracy") in the latest validation."""
    split, name = monitor.split("/", 1)
    if name not in summary[split]:
        raise UserError(f"checkpoint.monitor={monitor}: validation reports {', '.join(summary[split])}")
    return summary[split][name]


def all_finite(accelerator, finite, grad_norm, precision):
    """Whether this optimizer step's loss (on every rank) and gradient norm are finite: the same
    answer on every rank, from one all-reduce and one host sync. Under fp16 the gradient scaler
    already skips steps with infinite gradients (that is how it finds its scale), so only the
    loss counts."""
    flag = ~finite
    if grad_norm is not None and precision != "fp16":
        flag = flag | ~torch.isfinite(grad_norm)
    flag = flag.float()
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return flag.item() == 0


class StepStats:
    """Per-window sums of the gradient norm and skipped steps, kept on the device."""

    def __init__(self, device):
        self.norm, self.steps, self.measured, self.skipped = torch.zeros((), device=device), 0, 0, 0

    def add(self, grad_norm, good):
        self.steps += 1
        self.skipped += not good
        if grad_norm is not None and good:
            self.norm += grad_norm.detach().float()
            self.measured += 1

    def read(self):
        result = {"skipped_steps": self.skipped}
        if self.measured:
            result["grad_norm"] = self.norm.item() / self.measured
        self.__init__(self.norm.device)
        return result


@torch.no_grad()
def evaluate(accelerator, model, loader, recipe, cfg, split):
    """Exact metrics of `model` over `loader`'s whole split, summed over all ranks.

    Ranks may hold different numbers of batches (the split is not padded). With DDP that is safe:
    the unwrapped model runs no collective, and the one collective is the final reduce. FSDP
    gathers weights inside every forward, so there each rank runs as many forwards as the busiest
    one, repeating its last batch and ignoring the result.
    """
    sharded = accelerator.distributed_type == DistributedType.FSDP
    net = model if sharded else accelerator.unwrap_model(model)
    if accelerator.num_processes > 1 and not sharded:
        # Every rank evaluates rank 0's model: DDP keeps weights in sync but buffers (BatchNorm
        # statistics) drift apart between its broadcasts.
        for buffer in net.buffers():
            broadcast(buffer, from_process=0)
    was_training = net.training
    net.eval()
    totals = Totals(cfg.loss_per or "samples")
    with accelerator.autocast():  # the same precision for the EMA copy as for the prepared model
        batch = None
        for batch in loader:
            loss, counts = recipe.loss(net, batch, cfg)
            totals.add(loss, counts)
        if sharded:
            most = max(accelerator.gather(torch.tensor([len(loader)], device=accelerator.device)).tolist())
            if most > len(loader) and batch is None:
                raise UserError("under FSDP every process needs at least one evaluation batch: lower "
                                "eval_batch_size or use fewer processes")
            for _ in range(most - len(loader)):
                recipe.loss(net, batch, cfg)
    net.train(was_training)
    sums = totals.reduce(accelerator)
    if not sums.get("samples"):  # the same sums on every rank: all stop here together
        raise UserError(f"the {split} split has no sample" + (" (its stream yielded nothing)" if isinstance(
            loader, data.StreamLoader) else ""))
    return summarize(sums, getattr(recipe, "metrics", None), cfg.loss_per or "samples")


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
    if data.has_length(train) and len(train) == 0:
        raise UserError("the train split is empty")
    if not data.has_length(train):
        s = cfg.sched
        needs = [need for need, on in (
            (f"sched.name={s.name}", s.name == "step" or (s.name != "constant" and not cfg.max_steps)),
            (f"sched.warmup_epochs={s.warmup_epochs}", s.warmup_epochs and not s.warmup_steps),
        ) if on]
        if needs:
            raise UserError(f"{' and '.join(needs)} needs the length of an epoch, but the train split "
                            f"({type(train).__name__}) is a stream without one: set max_steps (with cosine, linear "
                            f"or onecycle), use sched.warmup_steps, or give the dataset a __len__")


def limit_splits(splits, cfg, num_processes):
    """`limit_batches` and `debug.overfit_batches`: the first N batches' worth of samples (over all
    processes) of a split; overfitting trains and validates on the same ones. A stream is cut as
    it is read (see make_loader); to overfit, its first samples are kept in memory (and a pass
    over them is an epoch)."""
    def first(split, batches, batch_size):
        n = batches * batch_size * num_processes
        if data.is_stream(splits[split]):
            return list(itertools.islice(splits[split], n))
        return torch.utils.data.Subset(splits[split], range(min(n, len(splits[split]))))

    limited = dict(splits)
    for split, batches in cfg.limit_batches.items():
        if batches and split in splits and not data.is_stream(splits[split]):
            limited[split] = first(split, batches, cfg.batch_size if split == "train" else cfg.eval_batch_size)
    if cfg.debug.overfit_batches:
        few = limited["val"] = first("train", cfg.debug.overfit_batches, cfg.batch_size)
        # Repeated to the length of a real epoch: the real run's steps and LR schedule (a decay to
        # zero after a few steps would stop short of memorising them).
        limited["train"] = few if isinstance(few, list) else \
            torch.utils.data.Subset(few, [i % len(few) for i in range(len(limited["train"]))])
    return limited


def make_loader(split, dataset, cfg, recipe, processes):
    """A loader for one split; the training one shuffles. A dataset that serves whole batches
    (`toolkit.data.TensorDataset`, also inside a Subset) brings its own `collate_fn`; a recipe's
    `collate` wins. Other map-style datasets draw their samples' randomness from (seed, epoch,
    index); a stream (IterableDataset) gets a `StreamLoader`."""
    training = split == "train"
    batch_size = cfg.batch_size if training else cfg.eval_batch_size
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        base = base.dataset
    collate = getattr(recipe, "collate", None) or getattr(base, "collate_fn", None)
    if data.is_stream(dataset):
        limit = cfg.limit_batches[split] * batch_size * processes.num_processes
        return data.StreamLoader(dataset, batch_size, cfg.num_workers, collate, processes, cfg.seed,
                                 agree=training, limit=limit)
    if not isinstance(base, (data.TensorDataset, torch.utils.data.TensorDataset)):
        dataset = data.SeededSamples(dataset, cfg.seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=processes.device.type == "cuda",
        collate_fn=collate,
        # Its own generator (it seeds the workers), so that starting an epoch, or resuming in the
        # middle of one, draws nothing from the global RNG that the training step uses.
        generator=torch.Generator().manual_seed(cfg.seed + processes.process_index),
    )


def prepare_loader(accelerator, loader, training):
    """Accelerate shards a map-style loader over the ranks. Evaluation shards are not padded to
    equal length (even_batches=False), so every sample is counted exactly once; ranks may then
    run different numbers of batches, which `evaluate` allows. A StreamLoader shards itself."""
    if isinstance(loader, data.StreamLoader):
        return loader
    accelerator.even_batches = training
    prepared = accelerator.prepare(loader)
    accelerator.even_batches = True
    return prepared


def skip_first_batches(loader, batches):
    """`loader` without its first `batches` batches: where a resumed epoch continues."""
    if not batches:
        return loader
    if isinstance(loader, data.StreamLoader):
        return loader.skip_first_batches(batches)
    return accelerate.skip_first_batches(loader, batches)


def steps_per_epoch(loader, cfg):
    """Optimizer steps per epoch, or None for a stream (check_splits made sure none is needed)."""
    return math.ceil(len(loader) / cfg.grad_accum) if data.has_length(loader) else None


def build_model(recipe, cfg, weights="", strict=False, ema=False, compile=True):
    """The recipe's model as training runs it: `weights` loaded (init_from, or a checkpoint's
    for `test`), channels_last, then, if `ema` and ema.decay, its average, then compiled. `train`
    and `test` both build it here, so the same weights give the same numbers. Returns (model,
    the EMA model or None, (missing, unexpected) weight names or None)."""
    model = recipe.model(cfg)
    loaded = checkpoint.load_weights(model, weights, strict=strict) if weights else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema.decay), use_buffers=True) \
        if ema and cfg.ema.decay else None
    if cfg.compile and compile:
        model.compile()  # in place, so the weights keep their names: checkpoints do not depend on it
    return model, average, loaded


def start_processes(cfg):
    """The process group (Accelerate's PartialState) and whether it runs on the CPU.

    Without a GPU, several processes talk over gloo; Accelerate alone does this only under
    ACCELERATE_USE_CPU=1 and otherwise runs N unaware copies of the same training."""
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (
        int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available())
    mpi = any(key in os.environ for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ and not mpi:
        # What `accelerate launch --cpu --num_processes N` and MULTI_CPU configs do without mpirun.
        raise UserError("accelerate launch was asked for several CPU processes but started only this one (with "
                        "--cpu or a MULTI_CPU config it expects mpirun); for N processes on CPUs run "
                        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N launch.py ..., "
                        "or torchrun --nproc_per_node N launch.py ...")
    processes = PartialState(cpu=cpu)
    precision = cfg.precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and processes.device.type == "cpu":
        raise UserError("precision=fp16 needs a GPU (on the CPU it would silently train in fp32); "
                        "use precision=bf16 or precision=no")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    return processes, cpu


def log_header(accelerator, recipe, cfg, splits, model, run_dir, groups):
    """The opening lines of log.txt: what ran, where, on what (the console shows the short ones)."""
    changed = config.diff(cfg, config.resolve(recipe.config))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = accelerator.device.type
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(accelerator.device)}, CUDA {torch.version.cuda})"
    log.info(f"command: {shlex.join([sys.executable, *sys.argv])}", extra=FILE_ONLY)
    log.info(f"run {run_dir} | recipe {recipe.path} | changed from the recipe's config: "
             f"{' '.join(changed) if changed else 'nothing'}")
    log.info(f"{accelerator.num_processes} process(es) on {device} | precision {accelerator.mixed_precision} | "
             f"python {sys.version.split()[0]} | torch {torch.__version__} | "
             f"accelerate {__import__('accelerate').__version__}")
    sizes = ", ".join(f"{split} {len(ds) if data.has_length(ds) else 'stream'}" for split, ds in splits.items())
    log.info(f"data: {sizes} | "
             f"model {type(model).__name__}: {params:,} parameters ({trainable:,} trainable, "
             f"{params - trainable:,} frozen)")
    for name, module in model.named_children():
        counts = [p.numel() for p in module.parameters()]
        log.info(f"model {name}: {type(module).__name__}, {sum(counts):,} parameters in {len(counts)} tensors",
                 extra=FILE_ONLY)
    for line in groups:
        log.info(f"optimizer {line}", extra=FILE_ONLY)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device == "cpu" and accelerator.num_processes == 1 and torch.get_num_threads() == 1 and cores > 1:
        log.warning(f"torch computes on 1 of {cores} CPU cores (OMP_NUM_THREADS="
                    f"{os.environ.get('OMP_NUM_THREADS')}), which is what `accelerate launch` without a config "
                    f"sets; for all of them, use --num_cpu_threads_per_process {cores}, --config_file "
                    f"accelerate_configs/cpu.yaml or python launch.py")


# Dense bf16/fp16 peak FLOP/s of the GPUs whose name contains the key (their data sheets).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops_per_s(device, precision):
    """The device's peak FLOP/s in bf16/fp16 (the MFU denominator of PaLM and torchtitan), or 0
    where unknown (any CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return 0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), 0)
