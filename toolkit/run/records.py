"""The records of a training run: its log.txt and console banner, metrics.jsonl and trackers, and
summary.json, with how the run ended and, for a process that failed, why."""

import contextlib
import os
import shlex
import socket
import sys
import time
import traceback
from pathlib import Path

import accelerate
import torch

from toolkit import PeerFailure, UserError, config, distributed
from toolkit.data import mapstyle
from toolkit.run import logs, metrics_log, rundir, watchdog
from toolkit.run.logs import FILE_ONLY, format_metrics, log
from toolkit.run.notify import notify
from toolkit.run.summary import Status, Stop, Summary


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
        self.last_checkpoint = resumed_from  # the newest checkpoint of the run: the saver sets it
        self.summary = Summary(recipe=recipe.name, run_dir=str(run_dir), epochs=state.epoch, steps=state.step,
                               host=socket.gethostname(), pid=os.getpid())
        self.metrics = self.closing = None  # opened by __enter__

    def __enter__(self):
        main = self.accelerator.is_main_process
        if main:
            rundir.write_run_files(self.dir, self.cfg, None if self.resumed_from else self.recipe.path)
        with contextlib.ExitStack() as opening:  # a tracker that fails to start closes what opened before it
            opening.enter_context(logs.writing(self.dir, main))
            keep = self.state.metrics_lines if self.resumed_from else None
            self.metrics = opening.enter_context(metrics_log.Metrics(self.accelerator, self.dir, keep))
            self.closing = opening.pop_all()
        if main:
            self.summary.write(self.dir)  # `launch.py runs` shows it as running
        self.started = time.time() - self.state.wall_time_s  # training time: the setup above is not counted
        return self

    def __exit__(self, kind, error, trace):
        try:
            if error is not None:
                self.failed(error)
        finally:
            state, summary = self.state, self.summary
            summary.epochs, summary.steps = state.epoch, state.step
            summary.wall_time_s = round(time.time() - self.started, 2)
            if state.best is not None:
                summary.best = {"monitor": self.monitor, "value": state.best, "checkpoint": state.best_checkpoint}
            if self.accelerator.is_main_process:
                summary.write(self.dir)
                notify(self.cfg, summary)
            log.info(logs.result_line(summary), extra=FILE_ONLY)  # log.txt's last line, whatever happened
            self.closing.close()
        if summary.status == Status.FINISHED and self.accelerator.is_main_process:  # once, not once per machine
            print(logs.result_line(summary))

    def failed(self, error):
        """Record `error` in the summary (and, for a rank of several, in error-rank<N>.txt); a
        collective that broke because another process failed becomes a PeerFailure, and an error of
        the strategy that a key fixes a UserError that names the key."""
        accelerator, summary = self.accelerator, self.summary
        summary.status = Status.INTERRUPTED if isinstance(error, KeyboardInterrupt) else Status.FAILED
        explained = distributed.explain(error) or out_of_memory(error, self.cfg, self.state.step + 1)
        summary.error = explained or f"{type(error).__name__}: {error}"
        if accelerator.num_processes > 1 and distributed.lost_a_peer(error):
            failure = self._peer_failure()
            print(f"error: {failure}", file=sys.stderr, flush=True)  # now, while a SIGTERM cannot end it
            raise failure from error
        if accelerator.num_processes > 1 and not isinstance(error, KeyboardInterrupt):
            (self.dir / f"error-rank{accelerator.process_index}.txt").write_text(
                "".join(traceback.format_exception(error)).rstrip() + f"\nrank {accelerator.process_index}: "
                f"{distributed.first_line(error)}\n", encoding="utf-8")
        if explained:
            raise UserError(explained) from error

    def _peer_failure(self):
        """The summary and the PeerFailure of a process whose collective broke because another one
        ended: it failed, and wrote its error before it exited (below), or it hung, and its watchdog
        wrote its stacks."""
        summary, rank = self.summary, self.accelerator.process_index
        if watchdog.reported(self.dir):
            watchdog.record(summary, self.dir, self.state.step, self.cfg.watchdog_minutes)
            return PeerFailure(f"rank {rank} stopped: another process hung ({summary.error})")
        causes = [p.read_text().strip().splitlines()[-1] for p in sorted(self.dir.glob("error-rank*.txt"))]
        summary.error = f"another process failed: {'; '.join(causes) or 'see its error'}"
        return PeerFailure(f"rank {rank} stopped: another process failed "
                           f"({'; '.join(causes) or 'see its error above'})")

    def log_start(self, splits, model, groups, initialized, fitted=None):
        """The opening lines of log.txt: what runs, where, on what (the console shows the short ones);
        `fitted`: auto_batch_size's line, where it changed the sizes."""
        accelerator, cfg, recipe = self.accelerator, self.cfg, self.recipe
        changed = config.diff(cfg, config.resolve(recipe.config))
        params = sum(distributed.numel(p) for p in model.parameters())
        trainable = sum(distributed.numel(p) for p in model.parameters() if p.requires_grad)
        device = accelerator.device.type
        if device == "cuda":
            device = f"cuda ({torch.cuda.get_device_name(accelerator.device)}, CUDA {torch.version.cuda})"
        log.info(f"command: {shlex.join([sys.executable, *sys.argv])}", extra=FILE_ONLY)
        log.info(f"run {self.dir} | recipe {recipe.path} | changed from the recipe's config: "
                 f"{' '.join(changed) if changed else 'nothing'}")
        log.info(f"strategy: {distributed.describe(accelerator)} on {device} | precision {accelerator.mixed_precision} "
                 f"| python {sys.version.split()[0]} | torch {torch.__version__} | "
                 f"accelerate {accelerate.__version__}")
        sizes = ", ".join(f"{split} {len(ds) if mapstyle.has_length(ds) else 'stream'}" for split, ds in splits.items())
        log.info(f"data: {sizes} | "
                 f"model {type(model).__name__}: {params:,} parameters ({trainable:,} trainable, "
                 f"{params - trainable:,} frozen)")
        for name, module in model.named_children():
            counts = [distributed.numel(p) for p in module.parameters()]
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
        if fitted:
            log.info(fitted)
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
        """Whether the run has trained for max_minutes (over all its sessions)."""
        minutes = self.cfg.max_minutes
        return bool(minutes) and time.time() - self.started > 60 * minutes

    def log_train(self, metrics, step, epoch, bar):
        """Log a train window's metrics (on a terminal, the bar shows the main ones)."""
        self.metrics.log("train", metrics, step, epoch)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_per_s=f"{metrics['samples_per_s']:.0f}",
                        data_wait=f"{metrics['data_wait']:.0%}")
        log.info(f"epoch {epoch} step {step} train {format_metrics(metrics)}",
                 extra=FILE_ONLY if not bar.disable else None)

    def ends(self, stopping):
        """Record why training ended (`stopping`: a `Stop`, or None after the last epoch); return
        whether the test follows."""
        state, summary = self.state, self.summary
        summary.status = stopping.status if stopping else Status.FINISHED
        if stopping == Stop.NAN:
            summary.error = (f"{state.bad_steps} optimizer steps in a row had a non-finite loss or gradient norm (more "
                             f"than nan_tolerance={self.cfg.nan_tolerance}); they were skipped and the last good state "
                             f"is saved in {self.last_checkpoint}")
        elif summary.status == Status.INTERRUPTED:
            summary.signal = stopping.value
            log.info(f"stopped by {stopping} at step {state.step}; continue with: python launch.py resume {self.dir}")
        elif stopping == Stop.PRUNED:  # ends cleanly, without testing: the search has no use for it
            log.info(f"pruned by the search at step {state.step}")
        elif stopping:
            log.info(f"stopped at step {state.step}: {stopping}")
        return stopping is None or stopping.tests


def out_of_memory(error, cfg, step):
    """One line for a step or an evaluation that ran out of the device's memory, that says what fits
    more; else None."""
    if not is_out_of_memory(error):
        return None
    auto = [] if cfg.auto_batch_size else ["auto_batch_size=true (which finds it)"]
    bf16 = ["precision=bf16"] if distributed.precision_of(cfg) == "no" else []
    cause = f" ({str(error).splitlines()[0][:160]})"
    if in_evaluation(error):
        where = "the validation before step 1" if step == 1 else f"an evaluation after step {step - 1}"
        smaller = [f"eval_batch_size={smaller_batch(cfg.eval_batch_size)}"] if cfg.eval_batch_size > 1 else []
        tries = [*smaller, *auto, *bf16]
        return (f"{where} ran out of memory with eval_batch_size={cfg.eval_batch_size} per process"
                + (f": try {', '.join(tries)}" if tries else "") + cause)
    size = smaller_batch(cfg.batch_size) if cfg.batch_size > 1 else None
    smaller = [f"batch_size={size} grad_accum={cfg.grad_accum * cfg.batch_size // size} (the same global batch)"] \
        if size else []
    tries = [*smaller, *auto, "activation_checkpointing=true", *bf16]
    return (f"step {step} ran out of memory with batch_size={cfg.batch_size} per process (eval_batch_size="
            f"{cfg.eval_batch_size}): try {', '.join(tries)}" + cause)


def in_evaluation(error):
    """Whether `error` was raised inside an evaluation: its traceback passes through
    toolkit/evaluation.py's `evaluate` (a room above this one, so named, not imported)."""
    return any(frame.f_code.co_name == "evaluate" and Path(frame.f_code.co_filename).match("toolkit/evaluation.py")
               for frame, _ in traceback.walk_tb(error.__traceback__))


def is_out_of_memory(error):
    """torch's OutOfMemoryError, or one of the errors that Accelerate's find_executable_batch_size
    takes for running out of memory (cuDNN's, a CPU allocator's, XPU's and NPU's)."""
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


def smaller_batch(size):
    """The next micro-batch size to try: half of an even size, else its largest divisor (so that
    grad_accum can make up the same global batch exactly)."""
    return next(d for d in range(size // 2, 0, -1) if size % d == 0)
