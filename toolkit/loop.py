"""The training loop. Read `train` top to bottom: build, prepare, then the epochs, each a loop of
optimizer steps (forward, backward, clip, step, schedule), after each of which `plan` says what
else to do: log, validate, save, stop.

Accelerate does device placement, DDP, mixed precision and gradient accumulation; everything else
is plain PyTorch. Performance rules kept here: the loss and metric counts stay on the device and
are read every `log_every` steps (with `skip_nonfinite`, also one flag per optimizer step); no
barrier in the hot loop; gradients freed with set_to_none.
"""

import contextlib
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
from typing import NamedTuple

import accelerate
import accelerate.optimizer
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DataLoaderConfiguration, DistributedType, broadcast, broadcast_object_list,
                               parse_flag_from_env, send_to_device, set_seed)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from toolkit import PeerFailure, UserError, checkpoint, config, data, logs, recipe as recipes, rundir, tracking
from toolkit.logs import FILE_ONLY, format_metrics, log
from toolkit.metrics import StepUnits, Totals, Window, summarize
from toolkit.notify import notify
from toolkit.optim import lr_schedule, make_optimizer, set_lr
from toolkit.signals import StopRequest

# Accelerate's optimizer step looks up whether the `lomo_optim` package is installed, twice per
# step, through importlib (about 0.1 ms each: 7% of a LeNet step on a CPU). The answer cannot
# change while the process runs.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def train(recipe, cfg, resume=None, autoresume=False, trial=None):
    """Train `recipe` with the resolved `cfg` in a new run folder, or, given `resume` (a run
    folder), continue that run from its latest checkpoint. Return the summary. With `autoresume`
    the new run's folder is <output_dir>/<recipe>/<name> (launch.py --autoresume). `trial`: a
    hook told each validation's monitored value, `trial.report(value, number) -> True` to stop
    (a search's trial that its pruner stops: `toolkit.search.Trial`)."""
    # Creating the first optimizer imports torch._dynamo (0.8 s on 2 CPU cores): let that happen
    # while the data loads, which mostly waits in zlib and torch, outside the GIL.
    threading.Thread(target=importlib.import_module, args=("torch._dynamo",), daemon=True).start()
    # The process group first, so that ranks can agree on things (the run folder) before any work.
    processes, cpu = start_processes(cfg)
    tracking.check_trackers(cfg)
    resume_from = checkpoint.find(resume) if resume else None
    state = checkpoint.verify(resume_from, processes.num_processes) if resume else checkpoint.TrainState()

    splits, model, ema, initialized = build(recipe, cfg, processes, weights="" if resume else cfg.init_from)
    if resume and state.split_sizes and state.split_sizes != sizes(splits):
        raise UserError(f"the recipe's datasets() now gives split lengths {sizes(splits)}, but the run trained on "
                        f"{state.split_sizes}: a resumed run needs the data it started with")
    state.split_sizes = sizes(splits)
    optimizer, groups = make_optimizer(cfg, model, recipe)
    loaders = {split: make_loader(split, ds, cfg, recipe, processes) for split, ds in splits.items()}
    set_seed(cfg.seed + processes.process_index)  # from here on each rank draws its own randomness (augmentation)

    run_dir = Path(resume) if resume else rundir.create(processes, cfg.output_dir, recipe.name, cfg.name, autoresume)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=cfg.precision, gradient_accumulation_steps=cfg.grad_accum,
        log_with=tracking.make_trackers(cfg, run_dir, state) or None, project_dir=run_dir,
        # Every rank shuffles with one seed and takes its shard of each batch list: the data order is
        # a function of (seed, epoch). Batches in pinned memory go to the GPU without blocking.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                  non_blocking=processes.device.type == "cuda"))
    model, optimizer = accelerator.prepare(model, optimizer)
    train_loader = prepare_loader(accelerator, loaders.pop("train"), training=True)
    eval_loaders = {split: prepare_loader(accelerator, loader, training=False) for split, loader in loaders.items()}
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    lr_factor = lr_schedule(cfg, steps_per_epoch=steps_per_epoch(train_loader, cfg))
    units = StepUnits(cfg.loss_per, accelerator, train_loader)  # exact gradients for a loss per token
    if resume_from:  # before anything in the run folder changes: a failed resume leaves the run as it was
        checkpoint.load(accelerator, resume_from, ema)
        if isinstance(train_loader, data.StreamLoader):  # its place in the pass, where the stream can say
            train_loader.resume_from(checkpoint.loader_point(resume_from, accelerator.process_index))

    monitor = monitor_for(cfg, has_val="val" in eval_loaders, has_ema=ema is not None)
    run = Run(accelerator, recipe, cfg, run_dir, state, resume_from, monitor)
    # The stop request's signal handlers outlive the run's records: a launcher's SIGTERM that comes
    # while this process records that another one failed must not kill it before it says why.
    with StopRequest(accelerator.num_processes) as stop, run:
        run.log_start(splits, accelerator.unwrap_model(model), groups, initialized)
        saver = checkpoint.Saver(accelerator, run_dir, model, ema, cfg.checkpoint.keep, monitor, run, train_loader)
        validate = Validator(accelerator, recipe, cfg, eval_loaders.get("val"), {"val": model, "val_ema": ema}, run,
                             trial)
        validate.sanity_check(splits.get("val"))  # a bad monitor or loss fails here, in seconds
        window = train_window(accelerator, recipe, cfg, accelerator.unwrap_model(model))
        finite = FiniteCheck(cfg, accelerator, state)  # skip_nonfinite
        stopping = None  # why training ends before `epochs`: max_steps, max_minutes, early_stop, a signal, nan, pruned
        last_epoch = state.epoch if cfg.max_steps and state.step >= cfg.max_steps else cfg.epochs
        for epoch in range(state.epoch + 1, last_epoch + 1):
            model.train()
            data.set_epoch(train_loader, epoch - 1)  # order and augmentation: functions of (seed, epoch)
            batches = skip_first_batches(train_loader, state.batch)
            length = len(train_loader) if data.has_length(train_loader) else None  # a stream has none
            bar = logs.progress_bar(accelerator, length, state.batch, f"epoch {epoch}/{cfg.epochs}")
            for batch in batches:
                with accelerator.accumulate(model):  # no DDP all-reduce until the last micro-batch
                    loss, counts = recipe.loss(model, batch, cfg)
                    accelerator.backward(units.weigh(loss, counts))  # exact weights: see StepUnits
                    finite.add(loss)
                    if accelerator.sync_gradients:
                        units.normalize(model)  # with loss_per: divide by the step's tokens
                        grad_norm = None  # measured when needed, and for the log on its steps
                        if cfg.clip_grad_norm or finite.on or (state.step + 1) % cfg.log_every == 0:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm or math.inf)
                        good = finite.step_is_good(grad_norm)  # the same answer on every rank: all skip, or none
                        if good:
                            set_lr(optimizer, base_lrs, lr_factor(state.step))
                            optimizer.step()
                        updated = good and not optimizer.step_was_skipped  # fp16's scaler skips some
                        optimizer.zero_grad(set_to_none=True)
                if not units.padding:  # a stream's rank that ran out repeats its last batch, weighed 0
                    window.add(loss, counts)
                state.batch += 1
                bar.update()
                if not accelerator.sync_gradients:
                    continue  # micro-batches of one optimizer step; everything below is per step

                state.step += 1
                window.step(grad_norm, updated)
                if ema is not None and updated:
                    ema.update_parameters(accelerator.unwrap_model(model))
                end_of_epoch = batches.end_of_dataloader
                todo = plan(state.step, epoch, end_of_epoch, cfg, stop.check(run.over_time()), state.bad_steps)
                if end_of_epoch:
                    state.epoch, state.batch = epoch, 0
                if todo.log:
                    run.log_train(window.read(accelerator, optimizer.param_groups[0]["lr"]), state.step, epoch, bar)
                best, reason = validate(state, epoch) if todo.validate else (False, None)  # reason: to stop
                stopping = todo.stop or reason
                if todo.save or best or reason:
                    saver.save(state, best)
                if todo.validate or todo.save:
                    window.restart()  # samples/s counts training time only
                if stopping:
                    break
            bar.close()
            if stopping:
                break
            if state.epoch < epoch:  # a resumed epoch had no batch left
                past_the_end(state, epoch)

        if run.ends(stopping):  # a normal end (not a signal, nan or pruning) goes on to test
            if "test" in eval_loaders:
                run.summary["test"] = evaluate(accelerator, model, eval_loaders["test"], recipe, cfg, "test")
                run.metrics.log("test", run.summary["test"], state.step, state.epoch)
            if cfg.debug.fast_run:
                checkpoint.load(accelerator, checkpoint.find(run_dir), ema)
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
    stop: str | None  # why training ends at this step: max_steps, max_minutes, nan, SIGTERM, SIGINT; else None


def plan(step, epoch, end_of_epoch, cfg, request=None, bad_steps=0):
    """What to do after optimizer step `step` of `epoch` (the step that ends the epoch, if
    `end_of_epoch`): a function of its arguments only. `request` is a reason to stop that every
    rank agreed on (a signal, max_minutes), `bad_steps` the non-finite steps skipped in a row.

    Mid-epoch, validations and saves follow val_every_steps and checkpoint.every_steps. At the end
    of an epoch, they follow val_every, checkpoint.every_epochs and every_steps. The run's end
    (its last epoch, or a stop for max_steps or max_minutes, mid-epoch too) validates and saves,
    so that every finished run has its final validation, its best and model.safetensors. Every
    stop saves."""
    ckpt = cfg.checkpoint
    stop = request or ("max_steps" if step == cfg.max_steps else None) or (
        "nan" if bad_steps > cfg.nan_tolerance else None)
    finishes = stop in ("max_steps", "max_minutes")
    if not end_of_epoch:
        validate = _every(cfg.val_every_steps, step) or finishes
        save = bool(stop) or _every(ckpt.every_steps, step)
        return Plan(_every(cfg.log_every, step) or validate or save, validate, save, stop)
    last = epoch == cfg.epochs or finishes
    validate = _every(cfg.val_every, epoch) or last
    save = _every(ckpt.every_epochs, epoch) or _every(ckpt.every_steps, step) or bool(stop) or last
    return Plan(True, validate, save, stop)


def monitor_for(cfg, has_val, has_ema):
    """checkpoint.monitor where the run can measure it (a val split; an EMA for val_ema/), else ""."""
    monitor = cfg.checkpoint.monitor
    return monitor if has_val and (has_ema or not monitor.startswith("val_ema/")) else ""


def train_window(accelerator, recipe, cfg, model):
    """The train metrics' `Window`, with the model FLOPs utilisation (MFU) where it can be known: on
    GPUs whose peak is known, for recipes that count their FLOPs (the `flops` hook)."""
    flops = recipe.flops(cfg, model) if hasattr(recipe, "flops") else 0
    return Window(cfg.loss_per or "samples", accelerator.device, getattr(recipe, "metrics", None), flops,
                  peak_flops_per_s(accelerator.device, accelerator.mixed_precision))


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


class Run:
    """The records of one training session, bound once: log.txt and the console, metrics.jsonl and
    the trackers (`metrics`), summary.json (`summary`) and the run's clock (`started`: time.time()
    at its start, less the time of its earlier sessions).

    `with run:` opens them, and ends them whatever happens: the summary says how the run ended (a
    failing rank of several also leaves its traceback in error-rank<N>.txt), it is written and
    sent (notify), log.txt gets the result line, and the files and trackers are closed."""

    def __init__(self, accelerator, recipe, cfg, run_dir, state, resumed_from, monitor):
        self.accelerator, self.recipe, self.cfg, self.dir, self.state = accelerator, recipe, cfg, run_dir, state
        self.resumed_from, self.monitor = resumed_from, monitor
        self.summary = {"status": "running", "recipe": recipe.name, "run_dir": str(run_dir), "epochs": state.epoch,
                        "steps": state.step, "host": socket.gethostname(), "pid": os.getpid()}
        self.metrics = self.closing = None  # opened by __enter__

    def __enter__(self):
        main = self.accelerator.is_main_process
        if main:
            rundir.write_run_files(self.dir, self.cfg, None if self.resumed_from else self.recipe.path)
        with contextlib.ExitStack() as opening:  # a tracker that fails to start closes what opened before it
            opening.enter_context(logs.writing(self.dir, main))
            keep = self.state.metrics_lines if self.resumed_from else None
            self.metrics = opening.enter_context(tracking.Metrics(self.accelerator, self.dir, keep))
            self.closing = opening.pop_all()
        if main:
            rundir.write_summary(self.dir, self.summary)  # `launch.py runs` shows it as running
        self.started = time.time() - self.state.wall_time_s  # training time: the setup above is not counted
        return self

    def __exit__(self, kind, error, trace):
        try:
            if error is not None:
                self.failed(error)
        finally:
            state, summary = self.state, self.summary
            summary.update(epochs=state.epoch, steps=state.step, wall_time_s=round(time.time() - self.started, 2))
            if state.best is not None:
                summary["best"] = {"monitor": self.monitor, "value": state.best, "checkpoint": state.best_checkpoint}
            if self.accelerator.is_main_process:
                rundir.write_summary(self.dir, summary)
                notify(self.cfg, summary)
            log.info(logs.result_line(summary), extra=FILE_ONLY)  # log.txt's last line, whatever happened
            self.closing.close()
        if summary["status"] == "finished" and self.accelerator.is_main_process:  # once, not once per machine
            print(logs.result_line(summary))

    def failed(self, error):
        """Record `error` in the summary (and, for a rank of several, in error-rank<N>.txt); a
        collective that broke because another process failed becomes a PeerFailure."""
        accelerator, summary = self.accelerator, self.summary
        summary["status"] = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        summary["error"] = f"{type(error).__name__}: {error}"
        if accelerator.num_processes > 1 and lost_a_peer(error):
            # The process that failed first wrote its error (below) before it exited, which is
            # what broke this collective.
            causes = [p.read_text().strip().splitlines()[-1] for p in sorted(self.dir.glob("error-rank*.txt"))]
            summary["error"] = f"another process failed: {'; '.join(causes) or 'see its error'}"
            failure = PeerFailure(f"rank {accelerator.process_index} stopped: another process failed "
                                  f"({'; '.join(causes) or 'see its error above'})")
            print(f"error: {failure}", file=sys.stderr, flush=True)  # now, while a SIGTERM cannot end it
            raise failure from error
        if accelerator.num_processes > 1 and not isinstance(error, KeyboardInterrupt):
            (self.dir / f"error-rank{accelerator.process_index}.txt").write_text(
                "".join(traceback.format_exception(error)).rstrip() + f"\nrank {accelerator.process_index}: "
                f"{first_line(error)}\n", encoding="utf-8")

    def log_start(self, splits, model, groups, initialized):
        """The opening lines of log.txt: what runs, where, on what (the console shows the short ones)."""
        accelerator, cfg, recipe = self.accelerator, self.cfg, self.recipe
        changed = config.diff(cfg, config.resolve(recipe.config))
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        device = accelerator.device.type
        if device == "cuda":
            device = f"cuda ({torch.cuda.get_device_name(accelerator.device)}, CUDA {torch.version.cuda})"
        log.info(f"command: {shlex.join([sys.executable, *sys.argv])}", extra=FILE_ONLY)
        log.info(f"run {self.dir} | recipe {recipe.path} | changed from the recipe's config: "
                 f"{' '.join(changed) if changed else 'nothing'}")
        log.info(f"{accelerator.num_processes} process(es) on {device} | precision {accelerator.mixed_precision} | "
                 f"python {sys.version.split()[0]} | torch {torch.__version__} | "
                 f"accelerate {accelerate.__version__}")
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
        launched = "ACCELERATE_MIXED_PRECISION" in os.environ  # by accelerate launch, which set the threads
        if device == "cpu" and accelerator.num_processes == 1 and torch.get_num_threads() == 1 and cores > 1 \
                and launched:
            log.warning(f"torch computes on 1 of {cores} CPU cores (OMP_NUM_THREADS="
                        f"{os.environ.get('OMP_NUM_THREADS')}), which is what `accelerate launch` without a config "
                        f"sets; for all of them, use --num_cpu_threads_per_process {cores}, --config_file "
                        f"accelerate_configs/cpu.yaml or python launch.py")
        if initialized:
            log.info(f"init_from {cfg.init_from}: missing keys {initialized[0] or 'none'}, "
                     f"unexpected keys {initialized[1] or 'none'}")
        if self.resumed_from:
            state = self.state
            log.info(f"resumed from {self.resumed_from} (epoch {state.epoch}, batch {state.batch}, step {state.step})")
            if state.num_processes != accelerator.num_processes:
                log.warning(f"the checkpoint was written by {state.num_processes} process(es), this run has "
                            f"{accelerator.num_processes}: the data shards differ, so the run continues but not "
                            f"exactly as it would have")

    def over_time(self):
        """The reason to stop, "max_minutes", once the run has trained that long (over all its sessions)."""
        minutes = self.cfg.max_minutes
        return "max_minutes" if minutes and time.time() - self.started > 60 * minutes else None

    def log_train(self, metrics, step, epoch, bar):
        """Log a train window's metrics (on a terminal, the bar shows the main ones)."""
        self.metrics.log("train", metrics, step, epoch)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_per_s=f"{metrics['samples_per_s']:.0f}")
        log.info(f"epoch {epoch} step {step} train {format_metrics(metrics)}",
                 extra=FILE_ONLY if not bar.disable else None)

    def ends(self, stopping):
        """Record why training ended; whether it ended normally (then `train` tests the model)."""
        state, summary = self.state, self.summary
        if stopping == "nan":
            summary.update(status="failed", error=(
                f"{state.bad_steps} optimizer steps in a row had a non-finite loss or gradient norm (more than "
                f"nan_tolerance={self.cfg.nan_tolerance}); they were skipped and the last good state is saved in "
                f"{checkpoint.find(self.dir)}"))
        elif stopping in ("SIGTERM", "SIGINT"):
            summary.update(status="interrupted", signal=stopping)
            log.info(f"stopped by {stopping} at step {state.step}; continue with: python launch.py resume {self.dir}")
        elif stopping == "pruned":  # ends cleanly, without testing: the search has no use for it
            summary["status"] = "pruned"
            log.info(f"pruned by the search at step {state.step}")
        else:
            if stopping:
                log.info(f"stopped at step {state.step}: {stopping}")
            summary["status"] = "finished"
        return summary["status"] == "finished"


class Validator:
    """Validates the model and its EMA (`models`: split name -> model or None) on the val split,
    logs their metrics, and, with a monitor, decides on rank 0 for every rank whether this is the
    best so far, and whether to stop: early_stop, or the `trial` hook (a search pruning this trial)."""

    def __init__(self, accelerator, recipe, cfg, loader, models, run, trial=None):
        self.accelerator, self.recipe, self.cfg, self.loader, self.run = accelerator, recipe, cfg, loader, run
        self.models = {split: net for split, net in models.items() if net is not None}
        self.trial = trial

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
        first = list(itertools.islice(val, n)) if data.is_stream(val) else \
            torch.utils.data.Subset(val, range(min(n, len(val))))
        with data.untouched_randomness(accelerator.device):
            loader = make_loader("val", first, cfg, self.recipe, accelerator, num_workers=0)
            batches = [send_to_device(batch, accelerator.device) for batch in loader]
            reported = {split: evaluate(accelerator, net, batches, self.recipe, cfg, "val")
                        for split, net in self.models.items()}
        if self.run.monitor:
            monitored(reported, self.run.monitor)

    def __call__(self, state, epoch):
        """Returns (whether it is the best so far, the reason to stop or None)."""
        if self.loader is None:
            return False, None
        cfg, summary, monitor = self.cfg, self.run.summary, self.run.monitor
        for split, net in self.models.items():
            summary[split] = evaluate(self.accelerator, net, self.loader, self.recipe, cfg, "val")
            self.run.metrics.log(split, summary[split], state.step, epoch)
            log.info(f"epoch {epoch}/{cfg.epochs} step {state.step} {split} {format_metrics(summary[split])}")
        if not monitor:
            return False, None
        value = monitored(summary, monitor)
        state.validations += 1
        # Rank 0 decides for all: the collectives that follow (a save, stopping) must match.
        main = self.accelerator.is_main_process
        pruned = bool(main and self.trial is not None and self.trial.report(value, state.validations))
        best, pruned = broadcast_object_list([state.improves(value, cfg.checkpoint.mode), pruned])
        state.best = value if best else state.best
        state.stale_validations = 0 if best else state.stale_validations + 1
        early = bool(cfg.early_stop.patience) and state.stale_validations >= cfg.early_stop.patience
        return best, "early_stop" if early else "pruned" if pruned else None


def build(recipe, cfg, processes, weights="", training=True, strict=False, use_ema=False):
    """The data and the model, built alike by `train` and `test` (so that the same weights give the
    same numbers), with one seed on every rank (so that data splits and initial weights agree
    everywhere). Returns (splits, model, the EMA model or None, the (missing, unexpected) names of
    `weights` or None).

    The model: the recipe's, with `weights` loaded (init_from, or a checkpoint's for `test`),
    channels_last, then, for training with ema.decay, its average, then compiled (except for
    `use_ema`: training validates its EMA weights uncompiled). For training, the splits are checked
    and cut (limit_batches, overfit_batches)."""
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    with processes.main_process_first():  # the main process downloads; the others then read its files
        splits = recipe.datasets(cfg)
    if training:
        check_splits(splits, cfg)
        splits = limit_splits(splits, cfg, processes.num_processes)
    same_everywhere(splits, processes)
    model = recipe.model(cfg)
    loaded = checkpoint.load_weights(model, weights, strict=strict) if weights else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema.decay), use_buffers=True).to(
        processes.device) if training and cfg.ema.decay else None
    if cfg.compile and not use_ema:
        model.compile()  # in place, so the weights keep their names: checkpoints do not depend on it
    return splits, model, ema, loaded


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
    splits, model, _, _ = build(recipe, cfg, processes, weights, training=False, strict=True, use_ema=use_ema)
    split = split or ("test" if "test" in splits else "val")
    if split not in splits:
        raise UserError(f"the recipe has no {split!r} split; it has {', '.join(splits)}")
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.precision)
    model = accelerator.prepare(model)
    loader = prepare_loader(accelerator, make_loader(split, splits[split], cfg, recipe, processes), training=False)
    metrics = evaluate(accelerator, model, loader, recipe, cfg, split)
    name = f"{split}_ema" if use_ema else split
    result = {"run_dir": str(run_dir), "checkpoint": path.name, "step": checkpoint.read_state(path).step,
              "split": name, name: metrics}
    if accelerator.is_main_process:
        rundir.write_json(Path(run_dir) / f"{name}-{path.name}.json", result)
        print(f"{name} {format_metrics(metrics)} | checkpoint {which} ({path.name}) | run {run_dir}")
    del model
    accelerator.free_memory()
    accelerator.end_training()
    return result


def first_line(error):
    """`Type: the first line of its message`: for an error raised in a DataLoader worker (which
    torch raises again with the worker's traceback as its message), the original one's."""
    lines = str(error).splitlines()
    if "Original Traceback (most recent call last):" in lines:
        after = lines[lines.index("Original Traceback (most recent call last):") + 1:]
        raised = [line for line in after if line.strip() and not line.startswith(" ")]
        if raised:
            return raised[0]
    lines = [line.strip() for line in lines if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


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


def sizes(splits):
    """{split: its length, or None for a stream}."""
    return {split: len(ds) if data.has_length(ds) else None for split, ds in splits.items()}


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


def make_loader(split, dataset, cfg, recipe, processes, num_workers=None):
    """A loader for one split; the training one shuffles. A dataset that serves whole batches
    (`toolkit.data.TensorDataset`, also inside a Subset) brings its own `collate_fn`; a recipe's
    `collate` wins. Other map-style datasets draw their samples' randomness from (seed, epoch,
    index); a stream (IterableDataset) gets a `StreamLoader`. `processes`: a PartialState or an
    Accelerator; `num_workers`: instead of cfg.num_workers."""
    training = split == "train"
    num_workers = cfg.num_workers if num_workers is None else num_workers
    batch_size = cfg.batch_size if training else cfg.eval_batch_size
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        base = base.dataset
    collate = recipes.collate(recipe, cfg) or getattr(base, "collate_fn", None)
    if data.is_stream(dataset):
        limit = cfg.limit_batches[split] * batch_size * processes.num_processes
        return data.StreamLoader(dataset, batch_size, num_workers, collate, processes, cfg.seed,
                                 agree=training, limit=limit)
    if not isinstance(base, (data.TensorDataset, torch.utils.data.TensorDataset)):
        dataset = data.SeededSamples(dataset, cfg.seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
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
    logs.quiet_libraries(processes.is_main_process)
    precision = cfg.precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and processes.device.type == "cpu":
        raise UserError("precision=fp16 needs a GPU (on the CPU it would silently train in fp32); "
                        "use precision=bf16 or precision=no")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    return processes, cpu


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
