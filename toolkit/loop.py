"""The training loop. Read `train` top to bottom: build, prepare, train, evaluate, log.

Accelerate does device placement, DDP and mixed precision; everything else is plain PyTorch.
Performance rules kept here: no host sync per step (the loss and counts stay on the device and
are read every `log_every` steps), no barrier in the hot loop, gradients freed with set_to_none.
"""

import os
import shlex
import sys
import time

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, broadcast, parse_flag_from_env, set_seed

from toolkit import UserError, config, tracking
from toolkit.metrics import Totals, summarize
from toolkit.tracking import FILE_ONLY, format_metrics, log


def train(recipe, cfg):
    """Train `recipe` with the resolved `cfg` in a new run folder; return the summary."""
    started = time.time()
    # The process group first, so that ranks can agree on things (the run folder) before any work.
    # Without a GPU, several processes talk over gloo; Accelerate alone does this only under
    # ACCELERATE_USE_CPU=1 and otherwise runs N unaware copies of the same training.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (
        int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)

    # Build with one seed on every rank, so that data splits and initial weights agree everywhere.
    set_seed(cfg.seed)
    with state.main_process_first():  # the main process downloads; the others then read its files
        splits = recipe.datasets(cfg)
    model = recipe.model(cfg)
    optimizer = make_optimizer(cfg, model, recipe)
    loaders = make_loaders(splits, cfg, recipe, state.device)
    # From here on each rank draws its own randomness (augmentation, dropout).
    set_seed(cfg.seed + state.process_index)

    run_dir = tracking.create_run_dir(state, cfg.output_dir, recipe.name, cfg.name)
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
        tracking.write_run_files(run_dir, cfg, recipe.path)
    tracking.setup_logging(run_dir, accelerator.is_main_process)
    metrics_log = tracking.Metrics(accelerator, run_dir, cfg)
    log_header(accelerator, recipe, cfg, splits, model, run_dir)

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, loaders.pop("train"))
    # Evaluation shards are not padded to equal length (even_batches=False), so every sample is
    # counted exactly once; ranks may then run different numbers of batches, which `evaluate`
    # allows.
    accelerator.even_batches = False
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in loaders.items()}
    accelerator.even_batches = True

    summary = {"status": "running", "run_dir": str(run_dir), "epochs": 0, "steps": 0}
    try:
        step = 0
        window, window_start = Totals(), time.perf_counter()
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            bar = tracking.progress_bar(accelerator, len(train_loader), f"epoch {epoch}/{cfg.epochs}")
            for i, batch in enumerate(train_loader, 1):
                loss, counts = recipe.loss(model, batch)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.add(loss, counts)
                bar.update()

                if step % cfg.log_every == 0 or i == len(train_loader):
                    metrics = summarize(window.reduce(accelerator), getattr(recipe, "metrics", None))
                    seconds, window_start = time.perf_counter() - window_start, time.perf_counter()
                    metrics["lr"] = optimizer.param_groups[0]["lr"]
                    metrics["samples_per_s"] = metrics["samples"] / seconds
                    metrics_log.log("train", metrics, step, epoch)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_per_s=f"{metrics['samples_per_s']:.0f}")
                    log.info(f"epoch {epoch} step {step} train {format_metrics(metrics)}",
                             extra=FILE_ONLY if not bar.disable else None)
            bar.close()
            summary.update(epochs=epoch, steps=step)

            if "val" in eval_loaders:
                summary["val"] = evaluate(accelerator, model, eval_loaders["val"], recipe)
                metrics_log.log("val", summary["val"], step, epoch)
                log.info(f"epoch {epoch}/{cfg.epochs} val {format_metrics(summary['val'])}")
            window_start = time.perf_counter()  # samples/s counts training time only

        if "test" in eval_loaders:
            summary["test"] = evaluate(accelerator, model, eval_loaders["test"], recipe)
            metrics_log.log("test", summary["test"], step, cfg.epochs)
        summary["status"] = "finished"
    except BaseException as e:
        summary["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        summary["wall_time_s"] = round(time.time() - started, 2)
        if accelerator.is_main_process:
            tracking.write_summary(run_dir, summary)
        if summary["status"] == "finished":
            log.info(tracking.result_line(summary), extra=FILE_ONLY)
        metrics_log.close()
        tracking.close_logging()
    accelerator.print(tracking.result_line(summary))
    # Drop the DDP model before its process group: the other way round, gloo processes abort at
    # exit ("terminate called without an active exception").
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()  # finishes the trackers and ends the process group
    return summary


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


def make_loaders(splits, cfg, recipe, device):
    """DataLoaders for the recipe's splits; the training one shuffles. A dataset that serves whole
    batches (`toolkit.data.TensorDataset`) brings its own `collate_fn`; a recipe's `collate` wins."""
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
    loaders = {}
    for split, dataset in splits.items():
        training = split == "train"
        loaders[split] = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size if training else cfg.eval_batch_size,
            shuffle=training,
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=device.type == "cuda",
            collate_fn=getattr(recipe, "collate", None) or getattr(dataset, "collate_fn", None),
        )
    return loaders


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
