"""Looking at runs: `launch.py runs [FOLDER]` lists them, `launch.py plot RUN...` draws their curves,
`launch.py plot SEARCH` a search's history."""

import json
import socket
from pathlib import Path

from toolkit import UserError
from toolkit.config import yaml_load
from toolkit.run.logs import text_table
from toolkit.run.summary import Status, Summary, alive


def list_runs(folder="runs"):
    """A table of the run folders under `folder`: name, recipe, status, epochs, best, wall time."""
    folder = Path(folder)
    runs = sorted(p.parent for p in folder.glob("**/config.yaml"))
    if not runs:
        raise UserError(f"no run folders under {folder}")
    rows = []
    for run in runs:
        summary = Summary.read(run)
        cfg = yaml_load((run / "config.yaml").read_text(encoding="utf-8"), run / "config.yaml") or {}
        best = summary.best
        rows.append([str(run.relative_to(folder)), summary.recipe or "?", status(summary),
                     f"{summary.epochs}/{cfg.get('epochs', '?')}",
                     f"{best['monitor']}={best['value']:.4g}" if best else "-",
                     f"{summary.wall_time_s:.0f}s" if summary.wall_time_s is not None else "-"])
    return text_table(rows, ["run", "recipe", "status", "epochs", "best", "time"])


def status(summary):
    """A `Summary`'s status as text; a run that says running but whose process is gone from this
    machine is reported as died."""
    if summary.status == Status.RUNNING and summary.host == socket.gethostname() and not alive(summary.pid):
        return "died"
    return str(summary.status)


def pyplot(what="plotting"):
    """matplotlib's pyplot, drawing into files (imported only by the commands that draw)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"{what} needs matplotlib: pip install -e '.[plot]'") from None
    return plt


def plot(runs, out=None):
    """Loss and metric curves of one or more runs (from metrics.jsonl) in one PNG; returns its path."""
    plt = pyplot()
    if len(runs) == 1 and (Path(runs[0]) / "settings.json").is_file() and (Path(runs[0]) / "search.json").is_file():
        return plot_search(Path(runs[0]), out, plt)
    records = {}
    for run in map(Path, runs):
        if not (run / "metrics.jsonl").is_file():
            raise UserError(f"{run} has no metrics.jsonl: is it a run folder?")
        records[run] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    names = ["loss"] + sorted({k for rs in records.values() for r in rs if r["split"] != "train"
                               for k, v in r.items() if isinstance(v, float) and k not in ("loss", "time")})
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, (run, rs) in enumerate(records.items()):  # a colour per run, a line style per split
            label = run.name if len(records) > 1 else ""
            for split, style in (("train", "-"), ("val", "--"), ("val_ema", ":")):
                points = [(r["step"], r[name]) for r in rs if r["split"] == split and name in r]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{i}", label=f"{label} {split}".strip(),
                            marker="." if split != "train" or len(points) == 1 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    out = Path(out) if out else (Path(runs[0]) / "curves.png" if len(runs) == 1 else Path("curves.png"))
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def plot_search(folder, out, plt):
    """A search's history, from its table (search.json) and its trials' metrics.jsonl: the objective
    of each trial in the order they were asked for, with the best so far, and every trial's monitor
    at each validation (pruned trials dashed, where they stopped)."""
    rows = sorted(json.loads((folder / "search.json").read_text()), key=lambda r: r["trial"])
    settings = json.loads((folder / "settings.json").read_text())
    monitor, maximize = settings["monitor"], settings["direction"] == "maximize"
    split, name = monitor.split("/", 1)
    figure, (history, curves) = plt.subplots(1, 2, figsize=(11, 4))
    best, so_far = None, []
    for r in rows:
        if r["status"] == Status.FINISHED:
            best = r["value"] if best is None else (max if maximize else min)(best, r["value"])
        so_far.append(best)
    for status, marker in ((Status.FINISHED, "o"), (Status.PRUNED, "x")):
        points = [(r["trial"], r["best"]) for r in rows if r["status"] == status and r["best"] is not None]
        if points:
            history.plot(*zip(*points), marker, label=status)
    history.step([r["trial"] for r in rows], so_far, where="post", color="k", alpha=0.5, label="best so far")
    failed = sum(r["status"].startswith("failed") for r in rows)
    history.set_title(f"{monitor} of each trial" + (f" ({failed} failed, not drawn)" if failed else ""))
    history.set_xlabel("trial")
    history.xaxis.get_major_locator().set_params(integer=True)
    for r in rows:
        path = Path(r["folder"]) / "metrics.jsonl" if r["folder"] else None
        if path is None or not path.is_file():
            continue
        points = [(x["step"], x[name]) for x in map(json.loads, path.read_text().splitlines()) if x["split"] == split]
        if points:
            curves.plot(*zip(*points), "--" if r["status"] == Status.PRUNED else "-", marker=".", alpha=0.7,
                        label=f"#{r['trial']}" if len(rows) <= 10 else None)
    curves.set_title(f"{monitor} at each validation (pruned: dashed)")
    curves.set_xlabel("step")
    for ax in (history, curves):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.tight_layout()
    out = Path(out) if out else folder / "history.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
