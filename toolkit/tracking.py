"""The run folder and what is written into it. Only the main process writes.

    runs/<recipe>/<YYYYmmdd-HHMMSS>[-<name>]/
        config.yaml      the resolved config; `--config config.yaml` reproduces the run
        <recipe>.py      a copy of the recipe file
        git.txt, git.diff   the commit of the recipe's repository and its uncommitted changes, if any
        log.txt          what the console showed, plus every train-metric line
        metrics.jsonl    one JSON object per logged train window or evaluation
        tensorboard/     event files (tracker "tensorboard")
        wandb/           the wandb run (tracker "wandb")
        summary.json     status, final metrics, steps and wall time
        checkpoints/, model.safetensors   written by toolkit.checkpoint
"""

import json
import logging
import netrc
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from toolkit import UserError
from toolkit.config import flatten, yaml_dump

log = logging.getLogger("toolkit")
FILE_ONLY = {"file_only": True}  # `log.info(msg, extra=FILE_ONLY)`: into log.txt, not onto the console


def create_run_dir(state, output_dir, recipe_name, name="", fixed=False):
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
    (run_dir / "config.yaml").write_text(yaml_dump(cfg.to_dict()), encoding="utf-8")
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


def write_summary(run_dir, summary):
    write_json(run_dir / "summary.json", summary)


def setup_logging(run_dir, is_main):
    """`toolkit` logger: console + log.txt on the main process; errors only elsewhere."""
    log.handlers.clear()
    log.propagate = False
    if not is_main:
        log.setLevel(logging.ERROR)
        log.addHandler(logging.StreamHandler(sys.stderr))
        return log
    log.setLevel(logging.INFO)
    to_file = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    to_console = _TqdmHandler()
    to_console.addFilter(lambda record: not getattr(record, "file_only", False))
    log.addHandler(to_file)
    log.addHandler(to_console)
    return log


def close_logging():
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


class _TqdmHandler(logging.Handler):
    """Prints above the progress bar instead of through it."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def progress_bar(accelerator, total, initial, desc):
    """A bar on the main process of an interactive terminal; elsewhere none (log lines instead)."""
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True, leave=True,
                disable=None if accelerator.is_main_process else True)


def make_trackers(cfg, run_dir, state):
    """Accelerate's trackers for `cfg.trackers` (given to `Accelerator(log_with=...)`), made here so
    that each writes into the run folder and continues on resume: tensorboard drops its events
    after the checkpoint's step; wandb resumes the same run (its id is kept in the checkpoint)."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    if "tensorboard" in cfg.trackers:
        purge = {"purge_step": state.step + 1} if state.step else {}
        trackers.append(TensorBoardTracker("tensorboard", run_dir, **purge))  # <run>/tensorboard
    if "wandb" in cfg.trackers:
        state.tracker_ids.setdefault("wandb", uuid.uuid4().hex[:12])
        w = cfg.wandb
        # A key left empty is left to wandb, which reads its WANDB_* variable (entity, group), or
        # given the variable's value here, where the toolkit has a default of its own.
        trackers.append(WandBTracker(
            w.project or os.environ.get("WANDB_PROJECT") or "minloop", name=run_dir.name,
            id=state.tracker_ids["wandb"], resume="allow", dir=w.dir or os.environ.get("WANDB_DIR") or str(run_dir),
            mode=wandb_mode(cfg), entity=w.entity or None, group=w.group or None,
            config={k: str(v) if isinstance(v, list) else v for k, v in flatten(cfg).items()}))
    return trackers


def wandb_mode(cfg):
    """wandb.mode, else $WANDB_MODE, else online."""
    return cfg.wandb.mode or os.environ.get("WANDB_MODE") or "online"


def check_trackers(cfg):
    """Before any run folder is made: wandb online needs credentials (wandb would otherwise fail
    after the run started, with a traceback)."""
    if "wandb" not in cfg.trackers or wandb_mode(cfg) != "online" or _wandb_credentials():
        return
    raise UserError("trackers has wandb in online mode, but no wandb credentials were found: run `wandb login`, "
                    "set WANDB_API_KEY, or use wandb.mode=offline (or WANDB_MODE=offline) to log without an account")


def _wandb_credentials():
    """Whether wandb will find an API key: where wandb itself looks (its variables, then ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Metrics:
    """metrics.jsonl plus Accelerate's trackers (tensorboard, wandb): one call logs to all.

    On resume, `keep_lines` cuts metrics.jsonl back to what the checkpoint had seen, and tensorboard
    drops its events from `first_step` on, so nothing logged after the checkpoint appears twice.
    """

    def __init__(self, accelerator, run_dir, keep_lines=None):
        self.accelerator = accelerator
        self.file, self.lines = None, 0
        if accelerator.is_main_process:
            path = run_dir / "metrics.jsonl"
            if keep_lines is not None:
                kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep_lines] if path.exists() else []
                path.write_text("".join(kept), encoding="utf-8")
            self.file = open(path, "a", encoding="utf-8")
            self.lines = keep_lines or 0
        self.start = time.time()
        accelerator.init_trackers("runs")  # starts the trackers made by make_trackers

    def log(self, split, metrics, step, epoch):
        if self.file is not None:
            record = {"step": step, "epoch": epoch, "split": split, **metrics,
                      "time": round(time.time() - self.start, 3)}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.lines += 1
        self.accelerator.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self):
        """Flush and close metrics.jsonl and every tracker (e.g. tensorboard's event files)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


def result_line(summary):
    """The last line of a run: its final metrics (or how it ended), its time and where its folder is."""
    split = "test" if "test" in summary else "val" if "val" in summary else None
    if summary["status"] != "finished":
        result = f"{summary['status']} at epoch {summary['epochs']} step {summary['steps']}" + (
            f" ({summary['error']})" if summary.get("error") else "")
    else:
        result = f"{split} {format_metrics(summary[split])}" if split else f"trained {summary['steps']} steps"
    return f"{result} | {summary['wall_time_s']:.1f}s | run {summary['run_dir']}"


def text_table(rows, headers):
    """Rows of strings as aligned columns."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [headers, *rows])


def format_metrics(metrics):
    return " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def read_json(path):
    """A JSON file's content, or {} when it is missing or unreadable (a run that never wrote it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_json(path, data):
    """Write JSON atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
