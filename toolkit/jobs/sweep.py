"""Sweeps: every combination of some config values, one run after another or K at a time.

    python launch.py sweep recipes/lenet.py optim.lr=1e-3,3e-3 batch_size=64,128 [--parallel 2]
    python launch.py sweep recipes/lenet.py --config grid.yaml      # with a `sweep:` block:
        sweep:
          optim.lr: [1e-3, 3e-3]
          batch_size: [64, 128]

Each run is a separate `launch.py` process (so one that fails cannot take the others down) with
its own run folder, all under <output_dir>/<recipe>/sweep-<time>/. Every combination's config is
checked before the first run starts. At the end a table of the runs, best first by their
`checkpoint.monitor`, is printed and saved as sweep.txt and sweep.json in the sweep folder.
With --parallel K, K runs train at once, each on its own GPUs or CPU cores (toolkit.jobs.pool), and
each run's console output goes to <sweep>/console/<run>.txt.
"""

import itertools
import re

from toolkit import UserError, config
from toolkit.jobs import launching
from toolkit.jobs.pool import Pool
from toolkit.run import logs, rundir, trackers
from toolkit.run.summary import Status, Summary


def read_grid(files, overrides):
    """(the files, a file with a sweep block as (path, its other keys), fixed overrides,
    {key: [value texts]})."""
    plain_files, blocks, fixed, varying = launching.read_layers(files, overrides, "sweep",
                                                                lambda raw: len(launching.values(raw)) > 1)
    grid = {}
    for path, block in blocks:
        if not isinstance(block, dict) or not all(isinstance(v, list) and v for v in block.values()):
            raise UserError(f"{path}: sweep: must map keys to lists of values, e.g. optim.lr: [1e-3, 3e-3]")
        grid.update({key: [config.yaml_dump(v).strip().removesuffix("\n...") for v in vs] for key, vs in block.items()})
    grid.update({key: launching.values(raw) for key, raw in varying.items()})
    if not grid:
        raise UserError("nothing to sweep: give values separated by commas (optim.lr=1e-3,3e-3) or a "
                        "sweep: block in a --config file")
    return plain_files, fixed, grid


def sweep(recipe, files, overrides, launcher="", parallel_runs=1):
    plain_files, fixed, grid = read_grid(files, overrides)
    points = [[f"{key}={value}" for key, value in zip(grid, combination)]
              for combination in itertools.product(*grid.values())]
    # Check every combination before running any: a typo should not surface after hours.
    base = config.resolve(recipe.config, plain_files, fixed)
    problems = []
    for point in points:
        try:
            config.resolve(recipe.config, plain_files, [*fixed, *point])
        except config.ConfigError as e:
            problems += [p for p in e.problems if p not in problems]
    if problems:
        raise config.ConfigError(problems)
    pool = Pool(parallel_runs)  # refuses --parallel larger than the GPUs before anything is written

    folder = launching.claim_folder(base, recipe, "sweep")
    files_used = [folder / name for name in launching.copy_configs(folder, plain_files)]  # without the sweep block
    group = trackers.group_overrides(base, folder.name)  # the sweep's runs together
    print(f"sweep of {len(points)} runs in {folder}: {', '.join(f'{k} in {v}' for k, v in grid.items())}")

    if parallel_runs > 1:
        pool.output_dir = folder / "console"
    names = [f"{i:0{len(str(len(points)))}d}-" + re.sub(r"[^\w.=+-]+", "_", "_".join(point))[:100]  # unique
             for i, point in enumerate(points, 1)]
    rows, waiting = [None] * len(points), list(range(len(points)))
    while waiting or pool.running:
        while waiting and pool.free:
            i = waiting.pop(0)
            command = launching.command(launcher, recipe.path, files_used, [*fixed, *points[i], *group], folder,
                                        names[i])
            slot = pool.start(i, command, name=names[i], fork=not launcher)  # see pool.forked
            print(f"\n[{i + 1}/{len(points)}] {' '.join(points[i])}" + (f" on {slot}" if parallel_runs > 1 else ""),
                  flush=True)
        for i, code in pool.wait():
            run = next(iter(sorted((folder / recipe.name).glob(f"*-{names[i]}"))), None)
            rows[i] = row(points[i], run, code)
            if parallel_runs > 1:
                print(f"[{i + 1}/{len(points)}] {' '.join(points[i])}: {rows[i]['status']}", flush=True)
    return report(rows, folder, base.checkpoint.mode)


def row(point, run, code):
    """A row of the table: `point` (the run's values), its run folder (None if it made none) and its exit status."""
    summary = Summary.read(run) if run else Summary(status=Status.FAILED)
    final = summary.metrics.get("test") or summary.metrics.get("val") or {}
    status = Status.FAILED if summary.status == Status.UNKNOWN else summary.status
    return {"run": " ".join(point), "folder": str(run) if run else "",
            "status": str(status) + ("" if code == 0 else f" (exit {code})"),
            "best": summary.best_value, "monitor": (summary.best or {}).get("monitor", ""),
            "final": {k: v for k, v in final.items() if k != "samples"},
            "split": "test" if summary.metrics.get("test") else "val", "wall_time_s": summary.wall_time_s}


def report(rows, folder, mode, kind="sweep"):
    """Print the table of `rows` (from `row`), best first, and save it as <kind>.txt and <kind>.json in
    `folder`. Finished runs come first, then pruned ones, then the others (failed, stopped)."""
    def rank(r):
        order = 0 if r["status"] == Status.FINISHED else 1 if r["status"] == Status.PRUNED else 2
        return order, r["best"] is None, -(r["best"] or 0) if mode == "max" else (r["best"] or 0)

    ranked = sorted(rows, key=rank)
    headers = ["run", "status", ranked[0]["monitor"] or "best", "final", "seconds"]
    lines = [[r["run"], r["status"], f"{r['best']:.4g}" if r["best"] is not None else "-",
              f"{r['split']} " + " ".join(f"{k}={v:.4g}" for k, v in r["final"].items()) if r["final"] else "-",
              f"{r['wall_time_s']:.1f}" if r["wall_time_s"] is not None else "-"] for r in ranked]
    text = logs.text_table(lines, headers)
    rundir.write_text(folder / f"{kind}.txt", text + "\n")
    rundir.write_json(folder / f"{kind}.json", ranked)
    print(f"\n{text}\n\n{kind} {folder}")
    return ranked
