"""`launch.py lr-find RECIPE`: the learning-rate range test (L. Smith, 2017; fastai's `lr_find`).

A run of the recipe as it would train (its model, data, optimizer and launcher), from a fresh model,
whose LR grows exponentially from `start` to `end` over `steps` optimizer steps (sched.name=
exponential), every step's loss logged. The curve is smoothed (a bias-corrected exponential moving
average over about a tenth of the steps), cut where it diverges (above 4 x its lowest point, or not
finite), and the suggestion is the LR where it falls fastest: the steepest descent of the smoothed
loss against log10(LR), between the first tenth of the steps and its lowest point. The run's
folder keeps its metrics.jsonl and the curve, lr_find.png.
"""

import json
import math
from pathlib import Path

from toolkit import UserError
from toolkit.jobs.runs import pyplot

DIVERGED = 4.0  # the smoothed loss above this x its lowest: the LR is past what trains


def lr_find(recipe, files, overrides, steps, start, end):
    """Run the range test; on the main process, print the suggestion and write the plot. Returns
    the suggested LR (None on the other processes)."""
    from accelerate import PartialState

    from toolkit import config, loop

    if not 0 < start < end:
        raise UserError(f"lr-find needs 0 < --start < --end; got --start {start:g} --end {end:g}")
    if steps < 10:
        raise UserError(f"lr-find needs --steps of 10 or more to draw a curve; got {steps}")
    plt = pyplot("lr-find's curve")
    # epochs=steps: every epoch holds a step at least, so max_steps ends the run (and the schedule).
    fixed = [f"optim.lr={start!r}", "sched.name=exponential", f"sched.gamma={end / start!r}", "sched.warmup_steps=0",
             "sched.warmup_epochs=0", f"max_steps={steps}", f"epochs={steps}", "log_every=1", "val_every=0",
             "val_every_steps=0", "checkpoint.monitor=", "checkpoint.every_epochs=0", "checkpoint.every_steps=0",
             "early_stop.patience=0", "ema.decay=0", "limit_batches.val=1", "limit_batches.test=1"]
    cfg = config.resolve(recipe.config, files, [*overrides, *fixed])
    summary = loop.train(recipe, cfg)
    if not PartialState().is_main_process:
        return None  # the main process alone reads the curve and says what it found
    run = Path(summary.run_dir)
    points = [(r["lr"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    lrs, losses, suggested = suggest(points)
    draw(plt, points, lrs, losses, suggested, run / "lr_find.png")
    print(f"suggested optim.lr={suggested:.3g} | the curve: {run / 'lr_find.png'} | run {run}")
    return suggested


def suggest(points):
    """(lrs, smoothed losses up to the divergence, the LR of their steepest descent) of the range
    test's (lr, loss) points, in step order."""
    beta = min(0.98, max(0.8, 1 - 10 / len(points)))  # averages over about a tenth of the steps
    lrs, smoothed, average, lowest = [], [], 0.0, math.inf
    for i, (lr, loss) in enumerate(points):
        if not math.isfinite(loss):
            break
        average = beta * average + (1 - beta) * loss
        value = average / (1 - beta ** (i + 1))
        if value > DIVERGED * lowest:
            break
        lowest = min(lowest, value)
        lrs.append(lr)
        smoothed.append(value)
    # The steepest descent lies before the lowest point: past it, the loss only rises or wanders.
    first, bottom = len(points) // 10, smoothed.index(lowest) if smoothed else 0
    if bottom - first < 3:
        raise UserError(f"the loss fell for {max(0, bottom - first)} steps past the first {first} of {len(points)}, "
                        f"from LR {points[0][0]:.3g}: start lower (--start) or take more steps (--steps)")
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i - 1]))
              for i in range(first + 1, bottom)]
    steepest = first + 1 + min(range(len(slopes)), key=slopes.__getitem__)
    return lrs, smoothed, lrs[steepest]


def draw(plt, points, lrs, smoothed, suggested, out):
    figure, ax = plt.subplots(figsize=(6, 4))
    ax.plot([lr for lr, _ in points], [loss for _, loss in points], alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, label="smoothed, up to the divergence")
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested optim.lr={suggested:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="train loss", title="LR range test")
    finite = [loss for _, loss in points if math.isfinite(loss)]
    if smoothed:
        ax.set_ylim(min(finite) * 0.95, max(smoothed) * 1.5)
    ax.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
