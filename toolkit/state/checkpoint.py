"""Checkpoints that never lie: complete, atomic, safe to load.

    <run>/checkpoints/
        step-0000516/          Accelerate's save_state files (model.safetensors, optimizer.bin,
                               random_states_<rank>.pkl, ...) and train_state.json, written last;
                               a model with frozen parameters: without them, and frozen.json
                               (toolkit/state/frozen.py)
        latest -> step-...     symlinks for people; the code finds checkpoints by listing folders
        best -> step-...
    <run>/model.safetensors    the best model's weights: safetensors + recipe.model(cfg) load them

Atomic: every rank writes into checkpoints/.tmp-<name>, then the main process renames it into
place. A `step-*` folder is therefore always complete; a crash mid-save leaves only a `.tmp-*`
folder, which the next save removes.

Safe: our own state is JSON. Accelerate reads the rest with `torch.load(weights_only=True)` or
safetensors; we register nothing with `register_for_checkpointing` (which Accelerate unpickles with
weights_only=False), and we check the RNG files first because Accelerate ignores a failure to
load them, which would make a resumed run silently differ.
"""

import dataclasses
import json
import logging
import re
import shutil
import time
from pathlib import Path

from accelerate.utils import load as safe_torch_load

from toolkit import UserError, distributed
from toolkit.run import rundir
from toolkit.run.logs import FILE_ONLY, log
from toolkit.state import frozen, weights

# save_state writes a tensor that two names share (tied embeddings) once, and Accelerate says so
# at every save; loading gives it back to both names (tested), so the line only adds noise.
logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())

FORMAT = 1
STATE_FILE = "train_state.json"
LOADER_FILE = "loader_state_{rank}.json"  # a stream's place, per rank (streams.StreamLoader.resume_point)
_NAME = re.compile(r"^step-(\d+)$")


@dataclasses.dataclass
class TrainState:
    """Where training is; saved as JSON beside Accelerate's files (its `load_state` forgets these)."""

    epoch: int = 0              # completed epochs
    batch: int = 0              # batches done in the next epoch (per rank)
    step: int = 0               # optimizer steps
    best: float | None = None   # best value of checkpoint.monitor so far
    best_checkpoint: str = ""   # the checkpoint that holds it
    metrics_lines: int = 0      # lines in metrics.jsonl when the checkpoint was written
    wall_time_s: float = 0.0    # training time before this checkpoint, over all sessions
    num_processes: int = 1      # world size that wrote it (the data shards depend on it)
    stale_validations: int = 0  # validations since the monitor last improved (early stopping)
    validations: int = 0        # validations of the monitor so far (the step a search's trial reports)
    bad_steps: int = 0          # optimizer steps skipped in a row for a non-finite loss or gradient
    ema_updates: int = 0        # updates averaged into the EMA weights
    tracker_ids: dict = dataclasses.field(default_factory=dict)  # e.g. the wandb run, to continue it
    split_sizes: dict = dataclasses.field(default_factory=dict)  # the splits' lengths (None: a stream)
    window: dict = dataclasses.field(default_factory=dict)  # the train log's window so far (metrics.Window)

    def improves(self, value, mode):
        return value is not None and (self.best is None or (value > self.best if mode == "max" else value < self.best))


def save(accelerator, run_dir, state, keep, best, model, ema=None, loader_point=None, trainable=None):
    """Save a checkpoint of everything prepared on `accelerator`, `state` and the `ema` weights
    (an AveragedModel, as ema.safetensors); if `best`, also export the weights to
    <run>/model.safetensors (and model_ema.safetensors). `loader_point`: this rank's place in a
    stream (the loader's `resume_point()`), as loader_state_<rank>.json. `trainable`: the
    `frozen.LeaveOutFrozen` registered on `accelerator`, that leaves frozen tensors out. Call on
    every rank."""
    folder = Path(run_dir) / "checkpoints"
    name = f"step-{state.step:07d}"
    tmp = folder / f".tmp-{name}"
    if accelerator.is_main_process:
        for leftover in folder.glob(".tmp-*"):  # from a save that a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # the model and optimizer (sharded: from every rank), RNG from every rank
    if loader_point is not None:
        _write_loader_point(tmp, accelerator.process_index, loader_point)
    best_weights = distributed.whole_state_dict(accelerator, model) if best else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            state.ema_updates = int(ema.n_averaged)
            average = ema.module.state_dict()
            weights.write_safetensors(trainable.without(average) if trainable else average, tmp / "ema.safetensors")
        if best:
            state.best_checkpoint = name
        for script in distributed.SCRIPTS:  # a checkpoint holds data, no code
            (tmp / script).unlink(missing_ok=True)
        for written in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            rundir.fsync(written)
        rundir.write_json(tmp / STATE_FILE, {"format": FORMAT, **dataclasses.asdict(state)})  # and fsyncs tmp
        final = folder / name
        if final.exists():  # the same step saved again (e.g. mid-epoch, then at the epoch's end)
            _remove(final)
        tmp.rename(final)
        rundir.fsync(folder)
        _point(folder / "latest", name)
        if best:
            _point(folder / "best", name)
            weights.export(best_weights, Path(run_dir) / "model.safetensors")
            if ema is not None:
                weights.export(ema.module.state_dict(), Path(run_dir) / "model_ema.safetensors")
        _prune(run_dir, keep, state.best_checkpoint)
    accelerator.wait_for_everyone()
    return Path(run_dir) / "checkpoints" / name


def _write_loader_point(folder, rank, point):
    """A stream's resume point as JSON; one that JSON cannot hold (a stream's own state of other
    types) is left out, and the resume reads the pass again."""
    try:
        text = json.dumps(point)
    except (TypeError, ValueError) as e:
        log.warning(f"the stream's state cannot be saved as JSON ({e}): a resume will read the pass again",
                    extra=FILE_ONLY)
        return
    (folder / LOADER_FILE.format(rank=rank)).write_text(text, encoding="utf-8")


def loader_point(checkpoint, rank):
    """The resume point that rank `rank`'s stream saved in `checkpoint`, or None."""
    path = Path(checkpoint) / LOADER_FILE.format(rank=rank)
    return _read_json(path) if path.is_file() else None


def _read_json(path):
    """One of a checkpoint's JSON files; UserError if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged") from None


class Saver:
    """Saves the checkpoints of one run (in the manner of timm's CheckpointSaver): bound once to
    what every save writes, then `save(state, best)` at each save point, on every rank."""

    def __init__(self, accelerator, run_dir, model, ema, keep, monitor, run, loader):
        self.accelerator, self.run_dir, self.model, self.ema = accelerator, run_dir, model, ema
        self.loader = loader  # the training loader, whose place in a stream a checkpoint keeps
        self.keep, self.monitor = keep, monitor
        self.run = run  # its clock (`started`) and metrics log, which a checkpoint records; it is told the path
        self.trainable = frozen.LeaveOutFrozen(accelerator, model)  # frozen tensors: rebuilt, not saved

    def save(self, state, best=False):
        state.wall_time_s = round(time.time() - self.run.started, 2)
        state.metrics_lines = self.run.metrics.lines  # a resume cuts metrics.jsonl back to these
        state.num_processes = self.accelerator.num_processes  # whose data shards `state.batch` counts
        path = save(self.accelerator, self.run_dir, state, self.keep, best, self.model, self.ema,
                    self.loader.resume_point(), self.trainable)
        self.run.last_checkpoint = path
        log.info(f"saved {path}" + (f" (best {self.monitor}={state.best:.6g})" if best else ""), extra=FILE_ONLY)
        return path


def complete(run_dir):
    """The complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()] \
        if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find(run_dir, which="latest"):
    """`latest`, `best` or a checkpoint's folder name -> its path; UserError if there is none."""
    checkpoints = complete(run_dir)
    if not checkpoints:
        raise UserError(f"{run_dir} has no complete checkpoint in {Path(run_dir) / 'checkpoints'}")
    if which == "latest":
        return checkpoints[-1]
    if which == "best":
        name = read_state(checkpoints[-1]).best_checkpoint
        if not name:
            raise UserError(f"{run_dir} has no best checkpoint yet (nothing was validated); use latest")
        which = name
    path = Path(run_dir) / "checkpoints" / which
    if path not in checkpoints:
        raise UserError(f"no complete checkpoint {which!r} in {run_dir}; there are: "
                        f"{', '.join(p.name for p in checkpoints)}")
    return path


def leaves_out_frozen(checkpoint):
    """Whether `checkpoint` was saved without the model's frozen tensors (which `init_from` may hold)."""
    return frozen.record_of(checkpoint) is not None


def read_state(checkpoint):
    path = Path(checkpoint) / STATE_FILE
    saved = _read_json(path)
    if not isinstance(saved, dict) or saved.pop("format", None) != FORMAT:
        raise UserError(f"{path} was not written by this version of the toolkit (format {FORMAT})")
    try:
        return TrainState(**saved)
    except TypeError as e:
        raise UserError(f"{path} does not describe a train state ({e})") from None


def verify(checkpoint, num_processes):
    """Check before any work that `checkpoint` can be resumed safely and exactly; return its state.

    Accelerate reads its files with weights_only=True, but it skips an RNG file it cannot read
    without a word (the run would silently differ), and it unpickles `custom_checkpoint_*.pkl`
    with weights_only=False. So: the RNG files must load safely, and those pickles must not exist.
    The files of a sharded checkpoint that their loaders unpickle must hold nothing else than such
    files hold (`distributed.check_pickles`)."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    custom = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*"))
    if custom:
        raise UserError(f"{checkpoint} holds {', '.join(custom)}, which this toolkit never writes and which "
                        f"would be unpickled with code execution; refusing to resume from it")
    for rank in range(num_processes):
        rng_file = checkpoint / f"random_states_{rank}.pkl"
        if rng_file.exists():
            _safe_load(rng_file)
    distributed.check_pickles(checkpoint)
    return state


def load(accelerator, checkpoint, model, ema=None):
    """Restore everything `save` wrote but the TrainState (`verify` returned it) into what is
    prepared on `accelerator` (`model`, the prepared model, and the `ema` beside it). Call on
    every rank, after `verify`."""
    distributed.refuse_a_foreign_checkpoint(accelerator, checkpoint, read_state(checkpoint).num_processes)
    left_out = frozen.record_of(checkpoint)
    try:  # without its frozen tensors, the model's other weights (the rebuilt frozen ones are checked below)
        accelerator.load_state(checkpoint, **({"strict": False} if left_out else {}))
    except Exception as e:  # noqa: BLE001 - e.g. a file that is not a plain tensor pickle
        raise UserError(f"cannot load {_unreadable(checkpoint) or checkpoint}: {weights.reason(e)}") from e
    if left_out:
        frozen.check(distributed.recipe_model(accelerator, model), left_out, checkpoint)
    if ema is not None:
        if not (Path(checkpoint) / "ema.safetensors").is_file():
            raise UserError(f"{checkpoint} has no EMA weights (ema.decay was 0 when it was saved)")
        average = weights.load_safetensors(Path(checkpoint) / "ema.safetensors", accelerator.device)
        weights.load_into(ema.module, average, optional=left_out["names"] if left_out else ())
        ema.n_averaged.fill_(read_state(checkpoint).ema_updates)


def weights_of(checkpoint, use_ema=False):
    """What `weights.load_weights` reads the model (or its EMA) of `checkpoint` from: ema.safetensors,
    or the folder, with its model.safetensors or its sharded model (whole weights, gathered in this
    one process); UserError if it holds neither."""
    checkpoint = Path(checkpoint)
    if use_ema:
        if not (checkpoint / "ema.safetensors").is_file():
            raise UserError(f"{checkpoint} has no ema.safetensors (the run had no EMA: ema.decay=0)")
        return checkpoint / "ema.safetensors"
    if not (checkpoint / "model.safetensors").is_file() and not distributed.written_by(checkpoint):
        raise UserError(f"{checkpoint} holds no model weights (model.safetensors or a sharded model)")
    return checkpoint


def _unreadable(checkpoint):
    """The first file of `checkpoint` that does not load safely (to name it in an error), or None."""
    for path in sorted(Path(checkpoint).iterdir()):
        try:
            if path.suffix == ".safetensors":
                weights.load_safetensors(path)
            elif path.suffix in (".bin", ".pt", ".pkl"):
                _safe_load(path)
        except UserError:
            return path
    return None


def _safe_load(path):
    try:
        return safe_torch_load(path)  # weights_only=True, with the numpy types RNG states need
    except Exception as e:  # noqa: BLE001 - any failure means the run could not continue exactly
        raise UserError(f"{path} cannot be loaded safely ({weights.reason(e)}); refusing to resume from it") from e


def _point(link, name):
    """Atomically make `link` a relative symlink to `name`."""
    try:
        with rundir.replacing(link) as tmp:
            tmp.symlink_to(name)
    except OSError:  # a file system without symlinks: the code does not need them
        pass


def _prune(run_dir, keep, best):
    """Keep the `keep` newest checkpoints (0: all) and the best one."""
    if keep <= 0:
        return
    for old in complete(run_dir)[:-keep]:
        if old.name != best:
            _remove(old)


def _remove(path):
    """Rename first (atomic), so that a crash mid-delete never leaves a half checkpoint that looks whole."""
    doomed = path.with_name(f".tmp-del-{path.name}")
    path.rename(doomed)
    shutil.rmtree(doomed)
