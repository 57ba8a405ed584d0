"""The training loop. Read `train` top to bottom: build, prepare, then the epochs, each a loop of
optimizer steps (forward, backward, clip, step, schedule), after each of which `plan` says what
else to do: log, validate, save, stop.

Accelerate does device placement, DDP, mixed precision and gradient accumulation; everything else
is plain PyTorch. Performance rules kept here: the loss and metric counts stay on the device and
are read every `log_every` steps (with `skip_nonfinite`, also one flag per optimizer step); no
barrier in the hot loop; gradients freed with set_to_none.
"""

import functools
import math
from pathlib import Path
from typing import NamedTuple

import accelerate.optimizer
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from toolkit import UserError, distributed, memory
from toolkit.build import build, sizes
from toolkit.data.loaders import make_loader, steps_per_epoch
from toolkit.evaluation import Validator, evaluate, monitor_for
from toolkit.metrics import Window
from toolkit.optim import StepUnits, lr_schedule, make_optimizer, set_lr
from toolkit.run import logs, profiling, rundir, trackers
from toolkit.run.logs import log
from toolkit.run.records import Run
from toolkit.run.signals import StopRequest
from toolkit.run.summary import Status, Stop
from toolkit.run.watchdog import Watchdog
from toolkit.state import checkpoint

# Accelerate's optimizer step looks up whether the `lomo_optim` package is installed, twice per
# step, through importlib (about 0.1 ms each: 7% of a LeNet step on a CPU). The answer cannot
# change while the process runs.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def train(recipe, cfg, resume=None, autoresume=False, trial=None):
    """Train `recipe` with the resolved `cfg` in a new run folder, or, given `resume` (a run
    folder), continue that run from its latest checkpoint. Return the summary. With `autoresume`
    the new run's folder is <output_dir>/<recipe>/<name> (launch.py --autoresume). `trial`: a
    hook told each validation's monitored value, `trial.report(value, number) -> True` to stop
    (a search's trial that its pruner stops: `toolkit.jobs.trial.Trial`)."""
    # The process group first, so that ranks can agree on things (the run folder) before any work.
    processes, cpu = distributed.start_processes(cfg)
    trackers.check_trackers(cfg)
    resume_from = checkpoint.find(resume) if resume else None
    state = checkpoint.verify(resume_from, processes.num_processes) if resume else checkpoint.TrainState()
    fitted = None  # auto_batch_size's sizes, found once: a resumed run has them in its config.yaml
    if cfg.auto_batch_size and not resume:
        cfg, fitted = memory.fit_batch_sizes(recipe, cfg, processes, cpu)

    # A resume loads the checkpoint's weights; init_from only where they left frozen tensors out.
    base = cfg.init_from if not resume or checkpoint.leaves_out_frozen(resume_from) else ""
    splits, model, ema, initialized = build(recipe, cfg, processes, weights=base)
    if resume and state.split_sizes and state.split_sizes != sizes(splits):
        raise UserError(f"the recipe's datasets() now gives split lengths {sizes(splits)}, but the run trained on "
                        f"{state.split_sizes}: a resumed run needs the data it started with")
    state.split_sizes = sizes(splits)
    optimizer, groups = make_optimizer(cfg, model, recipe)
    loaders = {split: make_loader(split, ds, cfg, recipe, processes) for split, ds in splits.items()}
    set_seed(cfg.seed + processes.process_index)  # from here on each rank draws its own randomness (augmentation)

    run_dir = Path(resume) if resume else rundir.create(processes, cfg.output_dir, recipe.name, cfg.name, autoresume)
    accelerator = Accelerator(
        mixed_precision=cfg.precision, gradient_accumulation_steps=cfg.grad_accum,
        **distributed.accelerator_options(cfg, cpu),  # the strategy's options (ddp.*, its plugin)
        log_with=trackers.make_trackers(cfg, run_dir, state) or None, project_dir=run_dir,
        # Every rank shuffles with one seed and takes its shard of each batch list: the data order is
        # a function of (seed, epoch). Batches in pinned memory go to the GPU without blocking.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                  non_blocking=processes.device.type == "cuda"))
    model, optimizer = accelerator.prepare(model, optimizer)
    distributed.finish_prepare(accelerator, model)
    train_loader = loaders.pop("train").prepare(accelerator, training=True)
    eval_loaders = {split: loader.prepare(accelerator, training=False) for split, loader in loaders.items()}
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    lr_factor = lr_schedule(cfg, steps_per_epoch=steps_per_epoch(train_loader, cfg))
    units = StepUnits(cfg.loss_per, accelerator, train_loader)  # exact gradients for a loss per token
    if resume_from:  # before anything in the run folder changes: a failed resume leaves the run as it was
        checkpoint.load(accelerator, resume_from, model, ema)
        train_loader.resume_from(checkpoint.loader_point(resume_from, accelerator.process_index))  # a stream's place

    monitor = monitor_for(cfg, has_val="val" in eval_loaders, has_ema=ema is not None)
    run = Run(accelerator, recipe, cfg, run_dir, state, resume_from, monitor)
    watchdog = Watchdog(cfg.watchdog_minutes, run, accelerator.process_index, accelerator.num_processes)
    # The stop request's signal handlers outlive the run's records: a launcher's SIGTERM that comes
    # while this process records that another one failed must not kill it before it says why.
    with StopRequest(accelerator.num_processes) as stop, run, watchdog, \
            profiling.window(cfg, run_dir, accelerator) as profiler:
        run.log_start(splits, distributed.recipe_model(accelerator, model), groups, initialized, fitted)
        saver = checkpoint.Saver(accelerator, run_dir, model, ema, cfg.checkpoint.keep, monitor, run, train_loader)
        validate = Validator(accelerator, recipe, cfg, eval_loaders.get("val"), {"val": model, "val_ema": ema}, run,
                             trial, watchdog.beat)
        validate.sanity_check(splits.get("val"))  # a bad monitor or loss fails here, in seconds
        window = train_window(accelerator, recipe, cfg, distributed.recipe_model(accelerator, model))
        window.carry_on(state.window, accelerator)  # a resumed run's windows are the unbroken run's
        finite = FiniteCheck(cfg, accelerator, state)  # skip_nonfinite
        stopping = None  # the `Stop`, when training ends before `epochs`
        last_epoch = state.epoch if cfg.max_steps and state.step >= cfg.max_steps else cfg.epochs
        for epoch in range(state.epoch + 1, last_epoch + 1):
            model.train()
            train_loader.set_epoch(epoch - 1)  # order and augmentation: functions of (seed, epoch)
            batches = train_loader.skip_first_batches(state.batch)
            bar = logs.progress_bar(accelerator, train_loader.length, state.batch, f"epoch {epoch}/{cfg.epochs}")
            for batch in window.timed(batches):  # the time waited for each batch: data_wait
                with accelerator.accumulate(model):  # no DDP all-reduce until the last micro-batch
                    loss, counts = recipe.loss(model, batch, cfg)
                    set_lr(optimizer, base_lrs, lr_factor(state.step))  # before backward: some strategies step in it
                    accelerator.backward(units.weigh(loss, counts))  # exact weights: see StepUnits
                    finite.add(loss)
                    if accelerator.sync_gradients:
                        units.normalize(model)  # with loss_per: divide by the step's tokens
                        grad_norm = None  # measured when needed, and for the log on its steps
                        if cfg.clip_grad_norm or finite.on or (state.step + 1) % cfg.log_every == 0:
                            grad_norm = distributed.clip_gradients(accelerator, model, cfg.clip_grad_norm or math.inf)
                        good = finite.step_is_good(grad_norm)  # the same answer on every rank: all skip, or none
                        if good:
                            optimizer.step()
                        updated = good and not optimizer.step_was_skipped  # fp16's scaler skips some
                        optimizer.zero_grad(set_to_none=True)
                if not train_loader.padding:  # a stream's rank that ran out repeats its last batch, weighed 0
                    window.add(loss, counts)
                state.batch += 1
                watchdog.beat()  # progress: watchdog_minutes without it is a hang
                bar.update()
                if not accelerator.sync_gradients:
                    continue  # micro-batches of one optimizer step; everything below is per step

                state.step += 1
                window.step(grad_norm, updated)
                if profiler is not None:  # profile.active: a window of steps under torch.profiler
                    profiler.step()
                if ema is not None and updated:
                    distributed.update_ema(accelerator, ema, model)
                end_of_epoch = batches.end_of_dataloader
                todo = plan(state.step, epoch, end_of_epoch, cfg, stop.check(run.over_time()), state.bad_steps)
                if end_of_epoch:
                    state.epoch, state.batch = epoch, 0
                if todo.log:
                    run.log_train(window.read(accelerator, optimizer.param_groups[0]["lr"]), state.step, epoch, bar)
                with window.paused():  # samples/s counts training time only
                    best, reason = validate(state, epoch) if todo.validate else (False, None)  # reason: to stop
                if reason and not todo.log:  # early stopping or pruning ends the run: its last window
                    run.log_train(window.read(accelerator, optimizer.param_groups[0]["lr"]), state.step, epoch, bar)
                stopping = todo.stop or reason
                if todo.save or best or reason:
                    with window.paused():
                        state.window = window.carried(accelerator)  # a resumed run goes on with it
                        saver.save(state, best)
                if stopping:
                    break
            bar.close()
            if stopping:
                break
            if state.epoch < epoch:  # a resumed epoch had no batch left
                past_the_end(state, epoch)

        if run.ends(stopping):  # a normal end (not a signal, nan or pruning) goes on to test
            if "test" in eval_loaders:
                tested = run.summary.metrics["test"] = evaluate(accelerator, model, eval_loaders["test"], recipe, cfg,
                                                                "test", watchdog.beat)
                run.metrics.log("test", tested, state.step, state.epoch)
            if cfg.debug.fast_run:
                checkpoint.load(accelerator, checkpoint.find(run_dir), model, ema)
                log.info("fast_run: one train, val and test step done, a checkpoint saved and loaded back")
    del model, optimizer  # before the process group: else gloo aborts at exit ("terminate called without...")
    accelerator.free_memory()
    accelerator.end_training()  # ends the process group (`run` ended the trackers)
    return run.summary


class Plan(NamedTuple):
    """What to do after an optimizer step, besides the step itself."""
    log: bool  # read the train window's metrics (the host sync) and log them
    validate: bool  # validate, if the recipe has a val split
    save: bool  # save a checkpoint (so does a validation that finds a new best, or a reason to stop)
    stop: Stop | None  # why training ends at this step: max_steps, max_minutes, nan, SIGTERM, SIGINT; else None


def plan(step, epoch, end_of_epoch, cfg, request=None, bad_steps=0):
    """What to do after optimizer step `step` of `epoch` (the step that ends the epoch, if
    `end_of_epoch`): a function of its arguments only. `request` is a reason to stop that every
    rank agreed on (a signal, max_minutes), `bad_steps` the non-finite steps skipped in a row.

    Mid-epoch, validations and saves follow val_every_steps and checkpoint.every_steps. At the end
    of an epoch, they follow val_every, checkpoint.every_epochs and every_steps. The run's end
    (its last epoch, or a stop for max_steps or max_minutes, mid-epoch too) validates and saves,
    so that every finished run has its final validation, its best and model.safetensors. Every
    stop saves. The train metrics are logged every log_every steps, whatever else the step does
    (evenly sized windows), and at the run's end."""
    ckpt = cfg.checkpoint
    stop = request or (Stop.MAX_STEPS if step == cfg.max_steps else None) or (
        Stop.NAN if bad_steps > cfg.nan_tolerance else None)
    finishes = stop is not None and stop.finishes
    if not end_of_epoch:
        validate = _every(cfg.val_every_steps, step) or finishes
        save = bool(stop) or _every(ckpt.every_steps, step)
        return Plan(_every(cfg.log_every, step) or ends(stop), validate, save, stop)
    last = epoch == cfg.epochs or finishes
    validate = _every(cfg.val_every, epoch) or last
    save = _every(ckpt.every_epochs, epoch) or _every(ckpt.every_steps, step) or bool(stop) or last
    return Plan(_every(cfg.log_every, step) or last or ends(stop), validate, save, stop)


def ends(stop):
    """Whether a stop ends the run for good, which logs the last train window. A signal's stop does not:
    its checkpoint keeps the window, which a resumed run goes on with."""
    return stop is not None and stop.status != Status.INTERRUPTED


def train_window(accelerator, recipe, cfg, model):
    """The train metrics' `Window`, with the model FLOPs utilisation (MFU) where it can be known: on
    GPUs whose peak is known, for recipes that count their FLOPs (the `flops` hook)."""
    return Window(cfg.loss_per or "samples", accelerator.device, recipe.metrics, recipe.flops(cfg, model),
                  distributed.peak_flops_per_s(accelerator.device))


def past_the_end(state, epoch):
    """A resumed epoch that had no batch left is over. That happens when the checkpoint was written
    mid-epoch by more processes or a smaller batch_size (--force) than this run has, whose epochs
    are shorter: the run goes on with the next epoch, without the end-of-epoch validation and save."""
    log.warning(f"epoch {epoch} had no batch left after the checkpoint's position (batch {state.batch} of its "
                f"processes and batch size): it is over, and training goes on with epoch {epoch + 1}")
    state.epoch, state.batch = epoch, 0


def _every(n, count):
    """Whether `count` is a multiple of `n` (never, for n=0: off)."""
    return bool(n) and count % n == 0


class FiniteCheck:
    """skip_nonfinite: whether an optimizer step's loss (on every rank) and gradient norm are
    finite, with the same answer on every rank from one all-reduce and one host sync per step.
    Gradients are all-reduced, so every rank sees the same norm, but the loss is per rank. Under
    fp16 the gradient scaler already skips steps with infinite gradients (that is how it finds its
    scale), so only the loss counts. Keeps `state.bad_steps`, the steps skipped in a row."""

    def __init__(self, cfg, accelerator, state):
        self.on, self.precision, self.accelerator, self.state = cfg.skip_nonfinite, cfg.precision, accelerator, state
        self.tolerance = cfg.nan_tolerance
        self.finite = torch.ones((), dtype=torch.bool, device=accelerator.device)

    def add(self, loss):
        """One micro-batch's loss, on the device (no host sync)."""
        if self.on:
            self.finite &= torch.isfinite(loss.detach())

    def step_is_good(self, grad_norm):
        """Whether to take this optimizer step; off, every step is good, at no cost."""
        good = True
        if self.on:
            flag = ~self.finite
            if grad_norm is not None and self.precision != "fp16":
                flag = flag | ~torch.isfinite(grad_norm)
            flag = flag.float()
            if self.accelerator.num_processes > 1:
                flag = self.accelerator.reduce(flag, reduction="sum")
            good = flag.item() == 0
            self.finite.fill_(True)
        self.state.bad_steps = 0 if good else self.state.bad_steps + 1
        if not good:
            log.warning(f"step {self.state.step + 1}: non-finite loss or gradient norm; step skipped "
                        f"({self.state.bad_steps} in a row, nan_tolerance={self.tolerance})")
        return good
