"""The work that the properties share: `Check` (the recipe, its config, a temporary folder, and what
the properties measure once), an evaluation and a training run of the recipe as a run does them,
and which samples of a split they read."""

import itertools
import os
import re
import shlex
import subprocess
from pathlib import Path

import torch

from toolkit import config
from toolkit.data import draws, mapstyle
from toolkit.jobs import launching
from toolkit.run.summary import Status, Summary
from toolkit.check.rows import Failed

WHOLE_PASS = 8  # evaluation batches: a stream of at most this many is counted whole
LEARN_STEPS = 30  # optimizer steps on the same few batches
LEARN_BATCHES = 2
LEARNING = (f"debug.overfit_batches={LEARN_BATCHES}", f"max_steps={LEARN_STEPS}", f"epochs={LEARN_STEPS}",
            "sched.name=constant", "sched.warmup_steps=0", "sched.warmup_epochs=0", f"log_every={LEARN_STEPS}",
            "val_every=0", "val_every_steps=0", "checkpoint.monitor=", "checkpoint.every_steps=0",
            "checkpoint.every_epochs=0", "limit_batches.train=0")


class Check:
    """The recipe, its config (the files and overrides of the command line, as a run would resolve
    them), a temporary folder, and what the properties measure once and share. With a `launcher`
    (e.g. 'accelerate launch --config_file FILE'), the training runs are its processes, under the
    strategy of its config; without one, they run in this process."""

    def __init__(self, recipe, files, overrides, folder, processes=2, launcher=""):
        self.recipe, self.files, self.overrides, self.folder = recipe, list(files), list(overrides), Path(folder)
        self.processes, self.launcher = processes, launcher
        self.cfg = self.resolve()
        self.splits = None  # the first call of datasets(), once the contract holds
        self.unbroken = None  # the resume check's unbroken run folder, for the data wait
        self._learned = None  # the summary of LEARNING's run

    def learned(self):
        """The summary of a short run of LEARNING (once): LEARN_STEPS steps on LEARN_BATCHES batches."""
        if self._learned is None:
            self._learned = self.train_run("learns", *LEARNING)
        return self._learned

    def trained(self):
        """The weights that the evaluation properties measure: the `learned` run's (an untrained
        model's metrics sit near their ceiling whatever it reads or draws, a trained one's show the
        differences), or None where that run did not finish (the learns property says why)."""
        from toolkit.state import checkpoint

        summary = self.learned()
        return str(checkpoint.find(summary.run_dir)) if summary.status == Status.FINISHED else None

    def resolve(self, *extra):
        """The config with `extra` overrides after the user's."""
        return config.resolve(self.recipe.config, self.files, [*self.overrides, *extra])

    def datasets(self):
        """The recipe's splits, as a run reads them (in this one process)."""
        from toolkit.build import recipe_splits

        return recipe_splits(self.recipe, self.cfg)

    def eval_samples(self, cfg):
        """How many samples of a split the evaluation checks read: two and a half batches and one."""
        return 2 * cfg.eval_batch_size + cfg.eval_batch_size // 2 + 1

    def reading(self, dataset):
        """How the sample count reads an evaluated split: (how many samples, how many it must count).
        A map-style split: its first `eval_samples`. A stream of at most WHOLE_PASS evaluation
        batches: all of it (its length, read here). A longer stream: its first `eval_samples` (to
        count as many with every number of workers and processes), if the toolkit splits it; if it
        splits itself (shards per worker, stream_part()), its first samples differ with the number
        of slots, and it is not read: (None, None)."""
        cfg = self.cfg
        limit = self.eval_samples(cfg)
        if not mapstyle.is_stream(dataset):
            return limit, min(limit, len(dataset))
        whole = WHOLE_PASS * cfg.eval_batch_size
        length = sum(1 for _ in itertools.islice(dataset, whole + 1))
        if length <= whole:
            return whole + 1, length
        return (None, None) if splits_itself(dataset, cfg.seed) else (limit, limit)

    def train_run(self, name, *extra, resume=None):
        """A training run of the recipe in <folder>/<name> (or, given `resume`, that run folder
        continued); its summary. The run's own records stay in its folder."""
        from toolkit import loop

        settings = ("trackers=[]", "max_minutes=0", "early_stop.patience=0", *extra)
        if self.launcher:
            return self.launched_run(self.folder / name, settings, resume)
        cfg = self.resolve(*settings, f"output_dir={self.folder / name}", "name=run")
        fresh_process_state()
        try:
            return loop.train(self.recipe, cfg, resume=resume)
        finally:
            fresh_process_state()

    def launched_run(self, output_dir, settings, resume=None):
        """`train_run` as processes of the launcher; the summary says why one failed (with the first
        error line of their console where they ended before the run began)."""
        if resume:
            args, run_dir = [*shlex.split(self.launcher), str(launching.LAUNCH), "resume", str(resume)], Path(resume)
        else:
            args, run_dir = launching.command(self.launcher, self.recipe.path, self.files,
                                              [*self.overrides, *settings], output_dir, "run"), None
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        run_dir = run_dir or next(Path(output_dir).glob("*/*"), Path(output_dir))  # <recipe>/<time>-run
        summary = Summary.read(run_dir)
        if done.returncode and not summary.error:
            summary.error = first_error(done.stderr) or f"the launcher exited with status {done.returncode}"
        summary.run_dir = str(run_dir)
        return summary

    def launched(self):
        """How the launcher's runs trained: 'under <the strategy line of the learns run's log>'."""
        log = Path(self.learned().run_dir) / "log.txt"
        found = re.search(r"strategy: (.*?) \|", log.read_text() if log.is_file() else "")
        return f"under {found.group(1)}" if found else f"under {self.launcher}"


def first_error(console):
    """The line of a launcher's console that says what failed: the toolkit's `error:` line, else the
    last exception line of a process's traceback (not the launcher's own ChildFailedError)."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in console.splitlines()]  # torchrun's prefix
    said = [line for line in lines if line.startswith("error: ")]
    raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line)
              and "ChildFailedError" not in line]
    return said[0] if said else raised[-1] if raised else ""


def fresh_process_state():
    """Forget what a run leaves in this process (Accelerate's state, torch's determinism switch),
    so that the next run in it starts as in a process of its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.use_deterministic_algorithms(False)


def finished(summary):
    """A training run's summary, if the run finished: else the property fails with its error."""
    if summary.status != Status.FINISHED:
        raise Failed(f"the run {summary.status}" + (f": {summary.error.splitlines()[0]}" if summary.error else ""))
    return summary


def evaluation(recipe, cfg, split, dataset, limit, num_workers, model=None, training=False, draws_from=None,
               salt=0, weights=None):
    """The metrics (with `samples`) of `model` (default: a fresh model of the recipe, with `weights`
    where given: a checkpoint) over the first `limit` samples of `dataset`, in this process's part
    when there are several, as a run's evaluation takes them (in training mode if `training`).
    `draws_from`: a seed for the global generators once the model is built, where a loss() or
    collate that draws would draw from; `salt`: other seeds for evaluation's draws of each batch
    and sample (toolkit.data.draws)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from toolkit.evaluation import evaluate
    from toolkit.data.loaders import make_loader
    from toolkit.distributed import start_processes
    from toolkit.state.weights import load_weights

    processes, cpu = start_processes(cfg)
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.precision)
    if model is None:
        set_seed(cfg.seed)  # the same initial weights for every evaluation
        model = recipe.model(cfg)
        if weights:
            load_weights(model, weights, strict=True, base=cfg.init_from)
    model.to(accelerator.device)
    if draws_from is not None:
        set_seed(draws_from)
    if not mapstyle.is_stream(dataset):
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    # A train split is read as evaluation reads val: in order, eval_batch_size at a time.
    loader = make_loader("val" if split == "train" else split, dataset, cfg, recipe, processes,
                         num_workers=num_workers, limit=limit)
    with draws.salted(salt):
        return evaluate(accelerator, model, loader.prepare(accelerator, training=False), recipe, cfg, split,
                        training=training)


def eval_splits(splits):
    """The splits whose samples an evaluation counts: val and test, else train."""
    return [split for split in ("val", "test") if split in splits] or ["train"]


def first(dataset, n):
    """The first `n` samples of a split (a stream's, read)."""
    if mapstyle.is_stream(dataset):
        return list(itertools.islice(dataset, n))
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))


def splits_itself(dataset, seed):
    """Whether a stream reads only its slot's part: a library's split over workers or processes,
    or stream_part() (seen as it reads its first sample)."""
    from toolkit.data.streams import StreamPart

    part = StreamPart(dataset, 0, 1, seed)
    part.set_epoch(0)
    next(iter(part), None)
    return part.splits_itself
