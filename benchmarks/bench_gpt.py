"""Tokens/s of recipes/gpt.py (byte-level GPT, 4 layers x 128 wide, batches of 32 chunks of up to
129 bytes, fused AdamW, clipping at 1.0, warmup + cosine), trained in one run of this script by

  (a) the toolkit: launch.py's main() on recipes/gpt.py, in this process (what `python launch.py
      recipes/gpt.py` runs), timed by its own train windows in metrics.jsonl
  (b) a hand-written PyTorch loop of the same model, data (the recipe's datasets and collate in a
      shuffling DataLoader), batch size, optimizer, clipping and schedule, timed around its loop

Both count only the non-pad target bytes as tokens, over steps WARMUP+1 .. WARMUP+STEPS of a fresh
model (the first steps are slower), in PAIRS pairs run back to back in the order a b, b a, a b, ...
so that a busy spell of a shared machine, or a drift, hits both sides alike. Start-up (imports,
reading the text, building the model), evaluation and checkpoints are not counted.

Two clocks, each giving both sides' tokens/s, pair by pair, and the median of the per-pair ratios
a/b, which is the toolkit's overhead (target >= 0.97):
  - wall clock: what a user waits; on 2 cores that other jobs kept busy (load 5), a pair's ratio
    ranged over 0.6-1.3, far more than the overhead being measured
  - CPU time of this process (CPU only): time slices that other processes take do not count, so
    the ratio swings less (0.87-1.17 on that machine; caches and cores are still shared). The
    loop's windows are timed by it by pointing toolkit.metrics' clock (the train windows') at
    time.process_time for the run; nothing else in the loop changes.
On a busy machine, OMP_NUM_THREADS=1 also steadies both: the 2 threads of a step wait for each other
whenever one of them is descheduled, and spin meanwhile.

    python benchmarks/bench_gpt.py                                              # on a CPU
    python benchmarks/bench_gpt.py precision=bf16 compile=true data.max_bytes=0   # on a GPU: wall clock only

Overrides apply to both sides; (b) honours precision=bf16 (autocast) and compile=true.
"""

import contextlib
import io
import math
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from common import REPO, machine, records, table

import launch  # noqa: E402 - common puts the repository on the path
from toolkit import config, metrics, recipe  # noqa: E402

GPT = recipe.load(REPO / "recipes" / "gpt.py")
WARMUP, STEPS, PAIRS = 5, 20, 5


def toolkit(overrides):
    """(tokens per wall second, tokens per CPU second) of steps WARMUP+1 .. WARMUP+STEPS of a run."""
    out = Path(tempfile.mkdtemp(prefix="bench-gpt-"))
    args = [str(REPO / "recipes" / "gpt.py"), f"max_steps={WARMUP + STEPS}", f"log_every={WARMUP}", "val_every=0",
            "limit_batches.val=1", "limit_batches.test=1", "checkpoint.every_epochs=0", "checkpoint.monitor=",
            "trackers=[]", *overrides, f"output_dir={out}"]
    console = io.StringIO()
    wall_clock = metrics.time  # the clock of the train windows (toolkit.metrics.Window)
    metrics.time = types.SimpleNamespace(time=time.time, perf_counter=time.process_time)
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            status = launch.main(args)
    finally:
        metrics.time = wall_clock
    if status:
        raise RuntimeError(f"launch.py {' '.join(args)} failed:\n{console.getvalue()[-3000:]}")
    warmup, *windows = records(next(out.glob("*/*")), "train")
    shutil.rmtree(out)
    tokens = sum(w["tokens"] for w in windows)
    # Each record's "time" is the wall clock when it was written, after the window's steps.
    return tokens / (windows[-1]["time"] - warmup["time"]), tokens / sum(w["samples"] / w["samples_per_s"]
                                                                        for w in windows)


def hand_written(cfg, data):
    """(tokens per wall second, tokens per CPU second) of steps WARMUP+1 .. WARMUP+STEPS."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = GPT.model(cfg).to(device)
    optimizer = GPT.optimizer(cfg, model)
    if cfg.compile:
        model.compile()
    total = min(cfg.max_steps or math.inf, cfg.epochs * math.ceil(len(data) / cfg.batch_size))
    warmup = cfg.sched.warmup_steps

    def factor(step):  # linear warmup, then cosine down to min_lr
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.sched.min_lr + (1 - cfg.sched.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, collate_fn=GPT.collate,
                                         pin_memory=device.type == "cuda")
    model.train()
    tokens = torch.zeros((), dtype=torch.long, device=device)
    for step, (inputs, targets) in enumerate(loader):
        if step == WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize()
            tokens.zero_()
            start, start_cpu = time.perf_counter(), time.process_time()
        if step == WARMUP + STEPS:
            break
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += (targets != -100).sum()
    count = tokens.item()  # waits for the GPU
    return count / (time.perf_counter() - start), count / (time.process_time() - start_cpu)


def main():
    overrides = sys.argv[1:]
    cfg = config.resolve(GPT.config, [], overrides)
    data = GPT.datasets(cfg)["train"]
    if len(data) < (WARMUP + STEPS) * cfg.batch_size:
        sys.exit(f"data.max_bytes={cfg.data.max_bytes} gives {len(data)} training chunks, fewer than "
                 f"{WARMUP + STEPS} batches of {cfg.batch_size}: raise it")
    pairs = []  # (toolkit, hand-written), each (wall, cpu)
    for i in range(PAIRS):
        if i % 2 == 0:
            a = toolkit(overrides)
            pairs.append((a, hand_written(cfg, data)))
        else:
            b = hand_written(cfg, data)
            pairs.append((toolkit(overrides), b))
    flops = GPT.flops(cfg, GPT.model(cfg))

    print(f"GPT {cfg.n_layer} layers x {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size}, "
          f"{' '.join(overrides) or 'recipe defaults'}; {machine()}; steps {WARMUP + 1}-{WARMUP + STEPS} "
          f"of each run, {PAIRS} interleaved pairs\n")
    rows = []
    for clock, name in ((0, "wall clock"), (1, "CPU time")):
        a = [p[0][clock] for p in pairs]
        b = [p[1][clock] for p in pairs]
        ratios = [p / q for p, q in zip(a, b)]
        rows += [[f"(a) toolkit, {name}", *(f"{x:,.0f}" for x in a), f"{statistics.median(a):,.0f}"],
                 [f"(b) hand-written, {name}", *(f"{x:,.0f}" for x in b), f"{statistics.median(b):,.0f}"],
                 [f"a / b, {name}", *(f"{x:.3f}" for x in ratios), f"{statistics.median(ratios):.3f}"]]
    table(rows, ["tokens/s", *(f"pair {i + 1}" for i in range(PAIRS)), "median"])
    wall = statistics.median(p[0][0] for p in pairs)
    print(f"\ntarget a / b >= 0.97. {flops / 1e6:.2f} MFLOP per token (the recipe's flops()): "
          f"(a) did {wall * flops / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
