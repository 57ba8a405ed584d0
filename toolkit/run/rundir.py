"""The run folder and the files written into it. Only the main process writes.

    runs/<recipe>/<YYYYmmdd-HHMMSS>[-<name>]/
        config.yaml      the resolved config; `--config config.yaml` reproduces the run
        <recipe>.py      a copy of the recipe file
        git.txt, git.diff   the commit of the recipe's repository and its uncommitted changes, if any
        log.txt          what the console showed, plus every train-metric line (toolkit.run.logs)
        metrics.jsonl    one JSON object per logged train window or evaluation (toolkit.run.metrics_log)
        tensorboard/     event files (tracker "tensorboard")
        wandb/           the wandb run (tracker "wandb")
        summary.json     status, final metrics, steps and wall time
        checkpoints/, model.safetensors   written by toolkit.state.checkpoint

Every file of the toolkit that a reader may open while it is written (summary.json, config.yaml, a
checkpoint's train_state.json and weights, a sweep's or a search's files) is written through
`replacing`: whole or not at all, and on disk once it returns, even when several processes (the
machines of one search) write the same file at once.
"""

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from toolkit import UserError
from toolkit.config import yaml_dump


def create(state, output_dir, recipe_name, name="", fixed=False):
    """Make a new run folder on the main process and share its path with every rank (and machine).
    With `fixed` (launch.py --autoresume) it is <output_dir>/<recipe>/<name>, which may exist from
    an attempt that stopped before its first checkpoint: that attempt's curves are dropped.

    Every rank writes its part of each checkpoint into it, so every machine must see it."""
    # Imported here: the sweep and search processes use this module without starting torch.
    from accelerate.utils import broadcast_object_list, gather_object

    path = None
    if state.is_main_process and fixed:
        path = Path(output_dir) / recipe_name / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(path / "tensorboard", ignore_errors=True)
        path = str(path)
    elif state.is_main_process:
        stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{name}" if name else "")
        path = str(claim_folder(Path(output_dir) / recipe_name / stamp))
    path = Path(broadcast_object_list([path])[0])
    if state.num_processes > 1:
        blind = [host for host, sees in gather_object([(socket.gethostname(), path.is_dir())]) if not sees]
        if blind:  # the same answer on every rank, so all stop here together
            if state.is_main_process and not fixed:
                path.rmdir()
            raise UserError(f"output_dir={output_dir} is not shared storage: the run folder {path} that the main "
                            f"process made is not there on {', '.join(sorted(set(blind)))}; put output_dir on "
                            f"storage that every machine sees (e.g. NFS)")
    return path


def claim_folder(base):
    """Create `base`, or `base`-1, -2, ... if taken: `mkdir` without `exist_ok` claims a name
    atomically, so two runs started in the same second never share a folder."""
    for i in range(1000):
        path = base.with_name(f"{base.name}-{i}") if i else base
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base} and 999 numbered variants exist")


def write_run_files(run_dir, cfg, recipe_path=None):
    """config.yaml (rewritten on resume, with the overrides it allowed), a copy of the recipe, and,
    when the code is in a git repository, its commit (git.txt) and uncommitted changes (git.diff):
    what it takes to run this again."""
    write_text(run_dir / "config.yaml", yaml_dump(cfg.to_dict()))
    if recipe_path is None:
        return
    shutil.copy2(recipe_path, run_dir / Path(recipe_path).name)
    where = Path(recipe_path).resolve().parent
    commit = _git(where, "rev-parse", "HEAD")
    if commit:
        (run_dir / "git.txt").write_text(f"{commit}\n", encoding="utf-8")
        diff = _git(where, "diff", "HEAD")
        if diff:
            (run_dir / "git.diff").write_text(diff + "\n", encoding="utf-8")


def _git(where, *args):
    try:
        done = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def read_json(path):
    """A JSON file's content, or {} when it is missing or unreadable (a run that never wrote it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path, text):
    """Write a text file atomically and durably (see `replacing`), readable as any other file."""
    with replacing(path) as tmp:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        readable(tmp)


@contextlib.contextmanager
def replacing(path):
    """A temporary path beside `path` for the block to write (a file, a link, or a folder that
    replaces an empty one), renamed over `path` when the block ends (a reader sees the old file or
    the new one, never a part), and the rename flushed to disk. If the block fails, `path` is left
    as it was and the temporary is removed.

    The name is this writer's alone (its pid and a random part): when several processes or threads
    write one file at once, none renames away another's half-written file, and the last rename
    wins with a complete file of its own."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():  # a folder (an export) that failed half way
            shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(tmp)
    fsync(path.parent)


def readable(path):
    """Give a file the permissions of any other new file (mkstemp and safetensors make them 0600):
    the people who may read the run folder may read its files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync(path):
    """Flush a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
