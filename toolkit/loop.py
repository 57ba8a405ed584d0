"""The training loop. Read `train` top to bottom: build, prepare, train, evaluate, log.

Accelerate does device placement, DDP and mixed precision; everything else is plain PyTorch.
Performance rules kept here: no host sync per step (the loss and counts stay on the device and
are read every `log_every` steps), no barrier in the hot loop, gradients freed with set_to_none.
"""

import os
import shlex
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, broadcast, parse_flag_from_env, set_seed

from toolkit import UserError, checkpoint, config, tracking
from toolkit.metrics import Totals, summarize
from toolkit.signals import StopRequest
from toolkit.tracking import FILE_ONLY, format_metrics, log


def train(recipe, cfg, resume=None):
    """Train `recipe` with the resolved `cfg` in a new run folder, or, given `resume` (a run
    folder), continue that run from its latest checkpoint. Return the summary."""
    # The process group first, so that ranks can agree on things (the run folder) before any work.
    processes, cpu = start_processes()
    resume_from = checkpoint.find(resume) if resume else None
    state = checkpoint.verify(resume_from, processes.num_processes) if resume else checkpoint.TrainState()

    # Build with one seed on every rank, so that data splits and initial weights agree everywhere.
    set_seed(cfg.seed)
    with processes.main_process_first():  # the main process downloads; the others then read its files
        splits = recipe.datasets(cfg)
    check_splits(splits)
    model = recipe.model(cfg)
    initialized = checkpoint.load_weights(model, cfg.init_from) if cfg.init_from and not resume else None
    optimizer = make_optimizer(cfg, model, recipe)
    loaders = {split: make_loader(split, ds, cfg, recipe, processes) for split, ds in splits.items()}
    # From here on each rank draws its own randomness (augmentation, dropout).
    set_seed(cfg.seed + processes.process_index)

    run_dir = Path(resume) if resume else tracking.create_run_dir(processes, cfg.output_dir, recipe.name, cfg.name)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.precision,
        log_with=list(cfg.trackers) or None,
        project_dir=run_dir,
        # All ranks shuffle with the same seed, then each takes its own shard of every batch list:
        # the data order depends only on `seed` and the epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    if accelerator.is_main_process:
        tracking.write_run_files(run_dir, cfg, None if resume else recipe.path)
    tracking.setup_logging(run_dir, accelerator.is_main_process)
    metrics_log = tracking.Metrics(accelerator, run_dir, state.metrics_lines if resume else None, state.step + 1)
    log_header(accelerator, recipe, cfg, splits, model, run_dir)
    if initialized:
        log.info(f"init_from {cfg.init_from}: missing keys {initialized[0] or 'none'}, "
                 f"unexpected keys {initialized[1] or 'none'}")

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, loaders.pop("train"))
    # Evaluation shards are not padded to equal length (even_batches=False), so every sample is
    # counted exactly once; ranks may then run different numbers of batches, which `evaluate`
    # allows.
    accelerator.even_batches = False
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in loaders.items()}
    accelerator.even_batches = True
    if resume_from:
        state = checkpoint.load(accelerator, resume_from)
        log.info(f"resumed from {resume_from} (epoch {state.epoch}, batch {state.batch}, step {state.step})")
        if state.num_processes != accelerator.num_processes:
            log.warning(f"the checkpoint was written by {state.num_processes} process(es), this run has "
                        f"{accelerator.num_processes}: the data shards differ, so the run continues but not "
                        f"exactly as it would have")

    ckpt = cfg.checkpoint
    monitor = ckpt.monitor if "val" in eval_loaders else ""
    summary = {"status": "running", "run_dir": str(run_dir), "epochs": state.epoch, "steps": state.step}
    stop = StopRequest(accelerator.num_processes)
    session_start = time.time() - state.wall_time_s
    state.num_processes = accelerator.num_processes

    window, window_start = Totals(), time.perf_counter()

    def log_train(epoch, bar):
        """Read the train window's sums (the host sync), log them and start the next window."""
        nonlocal window_start
        metrics = summarize(window.reduce(accelerator), getattr(recipe, "metrics", None))
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["samples_per_s"] = metrics["samples"] / (time.perf_counter() - window_start)
        metrics_log.log("train", metrics, state.step, epoch)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_per_s=f"{metrics['samples_per_s']:.0f}")
        log.info(f"epoch {epoch} step {state.step} train {format_metrics(metrics)}",
                 extra=FILE_ONLY if not bar.disable else None)  # the bar shows it on a terminal
        window_start = time.perf_counter()

    def save(best=False):
        nonlocal window_start
        state.wall_time_s = round(time.time() - session_start, 2)
        state.metrics_lines = metrics_log.lines
        path = checkpoint.save(accelerator, run_dir, state, ckpt.keep, best, model)
        log.info(f"saved {path}" + (f" (best {monitor}={state.best:.6g})" if best else ""), extra=FILE_ONLY)
        window_start = time.perf_counter()  # samples/s counts training time only

    try:
        stopping = None  # why training ends before `epochs`: "max_steps" or a signal's name
        last_epoch = state.epoch if cfg.max_steps and state.step >= cfg.max_steps else cfg.epochs
        for epoch in range(state.epoch + 1, last_epoch + 1):
            model.train()
            train_loader.set_epoch(epoch - 1)  # the order is a function of (seed, epoch): resumable
            batches = accelerator.skip_first_batches(train_loader, state.batch) if state.batch else train_loader
            bar = tracking.progress_bar(accelerator, len(train_loader), state.batch, f"epoch {epoch}/{cfg.epochs}")
            end_of_epoch = state.batch == len(train_loader)
            for batch in batches:
                loss, counts = recipe.loss(model, batch)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch += 1
                window.add(loss, counts)
                bar.update()

                stopping = stop.check() or ("max_steps" if state.step == cfg.max_steps else None)
                end_of_epoch = state.batch == len(train_loader)
                save_now = not end_of_epoch and (stopping or (ckpt.every_steps and state.step % ckpt.every_steps == 0))
                if state.step % cfg.log_every == 0 or end_of_epoch or save_now:
                    log_train(epoch, bar)
                if save_now:
                    save()
                if stopping:
                    break
            bar.close()
            if not end_of_epoch:  # stopped mid-epoch, saved above
                break
            state.epoch, state.batch = epoch, 0
            summary.update(epochs=epoch, steps=state.step)

            best = False
            if "val" in eval_loaders:
                summary["val"] = evaluate(accelerator, model, eval_loaders["val"], recipe)
                metrics_log.log("val", summary["val"], state.step, epoch)
                log.info(f"epoch {epoch}/{cfg.epochs} val {format_metrics(summary['val'])}")
                if monitor:
                    best = state.improves(monitored(summary["val"], monitor), ckpt.mode)
                    state.best = monitored(summary["val"], monitor) if best else state.best
            scheduled = (ckpt.every_epochs and epoch % ckpt.every_epochs == 0) or (
                ckpt.every_steps and state.step % ckpt.every_steps == 0)
            if best or scheduled or stopping or epoch == cfg.epochs:
                save(best)
            window_start = time.perf_counter()  # samples/s counts training time, not validation
            if stopping:
                break

        stop.finish()
        summary.update(epochs=state.epoch, steps=state.step)
        if stopping and stopping != "max_steps":
            summary.update(status="interrupted", signal=stopping)
            log.info(f"stopped by {stopping} at step {state.step}; continue with: "
                     f"python launch.py resume {run_dir}")
        else:
            if "test" in eval_loaders:
                summary["test"] = evaluate(accelerator, model, eval_loaders["test"], recipe)
                metrics_log.log("test", summary["test"], state.step, state.epoch)
            summary["status"] = "finished"
    except BaseException as e:
        summary["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        stop.close()
        summary["wall_time_s"] = round(time.time() - session_start, 2)
        if state.best is not None:
            summary["best"] = {"monitor": monitor, "value": state.best, "checkpoint": state.best_checkpoint}
        if accelerator.is_main_process:
            tracking.write_summary(run_dir, summary)
        if summary["status"] == "finished":
            log.info(tracking.result_line(summary), extra=FILE_ONLY)
        metrics_log.close()
        tracking.close_logging()
    if summary["status"] == "finished":
        accelerator.print(tracking.result_line(summary))
    # Drop the DDP model before its process group: the other way round, gloo processes abort at
    # exit ("terminate called without an active exception").
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()  # finishes the trackers and ends the process group
    return summary


def test(recipe, cfg, run_dir, which="best", split=""):
    """Evaluate checkpoint `which` (best, latest or a folder name) of the run in `run_dir` on `split`
    (default: test, else val); print the metrics and save them as <run>/<split>-<checkpoint>.json."""
    processes, cpu = start_processes()
    path = checkpoint.find(run_dir, which)
    set_seed(cfg.seed)
    with processes.main_process_first():
        splits = recipe.datasets(cfg)
    split = split or ("test" if "test" in splits else "val")
    if split not in splits:
        raise UserError(f"the recipe has no {split!r} split; it has {', '.join(splits)}")
    model = recipe.model(cfg)
    checkpoint.load_weights(model, path, strict=True)
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.precision)
    accelerator.even_batches = False  # count every sample once; see train()
    model, loader = accelerator.prepare(model, make_loader(split, splits[split], cfg, recipe, processes))
    metrics = evaluate(accelerator, model, loader, recipe)
    result = {"run_dir": str(run_dir), "checkpoint": path.name, "step": checkpoint.read_state(path).step,
              "split": split, split: metrics}
    if accelerator.is_main_process:
        tracking.write_json(Path(run_dir) / f"{split}-{path.name}.json", result)
    accelerator.print(f"{split} {format_metrics(metrics)} | checkpoint {which} ({path.name}) | run {run_dir}")
    del model
    accelerator.free_memory()
    accelerator.end_training()
    return result


def monitored(metrics, monitor):
    """The value of `monitor` (e.g. "val/accuracy") in a split's metrics."""
    name = monitor.split("/", 1)[1]
    if name not in metrics:
        raise UserError(f"checkpoint.monitor={monitor}: validation reports {', '.join(metrics)}")
    return metrics[name]


@torch.no_grad()
def evaluate(accelerator, model, loader, recipe):
    """Exact metrics of `model` over `loader`'s whole split, summed over all ranks.

    Runs the unwrapped model: no DDP collective happens per batch, so ranks may run different
    numbers of batches. The one collective is the final reduce, reached by every rank.
    """
    net = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        # Every rank evaluates rank 0's model: DDP keeps weights in sync but buffers (BatchNorm
        # statistics) drift apart between its broadcasts.
        for buffer in net.buffers():
            broadcast(buffer, from_process=0)
    net.eval()
    totals = Totals()
    for batch in loader:
        loss, counts = recipe.loss(net, batch)
        totals.add(loss, counts)
    return summarize(totals.reduce(accelerator), getattr(recipe, "metrics", None))


def make_optimizer(cfg, model, recipe):
    """The recipe's `optimizer(cfg, model)` if it has one, else `optim.*` from the config."""
    if hasattr(recipe, "optimizer"):
        return recipe.optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    return optimizer(params, lr=o.lr, weight_decay=o.weight_decay)


def check_splits(splits):
    if not isinstance(splits, dict) or "train" not in splits:
        raise UserError(f"the recipe's datasets() must return a dict with a 'train' entry "
                        f"(and optionally 'val', 'test'), got {type(splits).__name__}"
                        + (f" with keys {', '.join(splits)}" if isinstance(splits, dict) else ""))
    unknown = set(splits) - {"train", "val", "test"}
    if unknown:
        raise UserError(f"the recipe's datasets() returned unknown splits {', '.join(sorted(unknown))}; "
                        f"expected train, val, test")
    if len(splits["train"]) == 0:
        raise UserError("the train split is empty")


def make_loader(split, dataset, cfg, recipe, processes):
    """A DataLoader for one split; the training one shuffles. A dataset that serves whole batches
    (`toolkit.data.TensorDataset`) brings its own `collate_fn`; a recipe's `collate` wins."""
    training = split == "train"
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size if training else cfg.eval_batch_size,
        shuffle=training,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=processes.device.type == "cuda",
        collate_fn=getattr(recipe, "collate", None) or getattr(dataset, "collate_fn", None),
        # Its own generator (it seeds the workers), so that starting an epoch, or resuming in the
        # middle of one, draws nothing from the global RNG that the training step uses.
        generator=torch.Generator().manual_seed(cfg.seed + processes.process_index),
    )


def start_processes():
    """The process group (Accelerate's PartialState) and whether it runs on the CPU.

    Without a GPU, several processes talk over gloo; Accelerate alone does this only under
    ACCELERATE_USE_CPU=1 and otherwise runs N unaware copies of the same training."""
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (
        int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available())
    return PartialState(cpu=cpu), cpu


def log_header(accelerator, recipe, cfg, splits, model, run_dir):
    """The opening lines of log.txt: what ran, where, on what."""
    changed = config.diff(cfg, config.resolve(recipe.config))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"command: {shlex.join([sys.executable, *sys.argv])}", extra=FILE_ONLY)
    log.info(f"run {run_dir} | recipe {recipe.path} | changed from the recipe's config: "
             f"{' '.join(changed) if changed else 'nothing'}")
    log.info(f"{accelerator.num_processes} process(es) on {accelerator.device.type} | "
             f"precision {accelerator.mixed_precision} | torch {torch.__version__} | "
             f"accelerate {__import__('accelerate').__version__}")
    log.info(f"data: {', '.join(f'{split} {len(ds)}' for split, ds in splits.items())} | "
             f"model {type(model).__name__}: {params:,} parameters ({trainable:,} trainable)")
