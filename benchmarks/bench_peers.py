"""Training-loop samples/s of the same work trained by the toolkit and by the loops people use today:

  (a) toolkit:     `launch.py recipes/hf_classify.py`, timed by its own train windows (metrics.jsonl)
  (b) trainer:     `transformers.Trainer`, timed around `trainer.train()` (evaluation apart)
  (c) accelerate:  a plain Accelerate loop in the style of Accelerate's `nlp_example.py`, timed
                   around its training loop
  (d) fabric:      the same loop written for Lightning Fabric (`fabric.setup`, `fabric.backward`),
                   timed alike; it needs `pip install -e '.[bench]'` (lightning, for benchmarks only)

The work is one: recipes/hf_classify.py's model, tokenizer and data (with `model.name=tiny
data.name=stdlib`, offline: a 2-layer BERT 64 wide with the byte-level ByT5 tokenizer, on lines of
the standard library's sources labelled prose or code), tokenized once with `.map(batched=True)`,
`with_format("torch")`, padded per batch by `DataCollatorWithPadding`; batch 64, AdamW at lr 1e-3
and the recipe's weight decay, a linear schedule after 50 warmup steps, one epoch, seed 0, then an
evaluation of the val split, whose accuracy is printed to show that the work is the same.

Each side runs as a process of its own (imports, tokenizing and evaluation are not counted in the
samples/s), in PAIRS rounds of a, b, c in turn, so that a busy spell of the machine hits all alike.
Printed: each run's training samples/s, its accuracy, the whole process's wall and CPU seconds
(measured by this script from outside: imports and tokenizing included), and per peer the median of
the per-round ratios toolkit / peer (above 1: the toolkit is faster).

    python benchmarks/bench_peers.py [--pairs 5] [--lines 12000] [--threads 2]
    python benchmarks/bench_peers.py --gpu        # on a GPU: bert-base-cased sized, bf16 (from its config)
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "hf_classify.py"
PEERS = ("toolkit", "trainer", "accelerate", "fabric")


def settings(args):
    """The overrides every side uses, as key=value for the toolkit and a dict for the peers."""
    over = {"model.name": "tiny", "data.name": "stdlib", "data.max_lines": args.lines, "batch_size": 64,
            "eval_batch_size": 256, "epochs": 1, "seed": 0, "optim.lr": 1e-3, "sched.warmup_steps": 50,
            "trackers": "[]", "log_every": 10, "checkpoint.every_epochs": 0, "sanity_val_batches": 0}
    if args.gpu:
        over.update({"model.layers": 12, "model.width": 768, "precision": "bf16"})  # bert-base's shape
    return over


# ---------------------------------------------------------------------------------------------
# The sides, each run as `python bench_peers.py --side NAME --out FILE`

def load_recipe(overrides):
    sys.path.insert(0, str(REPO))
    from toolkit import config, recipe

    module = recipe.load(RECIPE)
    cfg = config.resolve(module.config, [], [f"{k}={v}" for k, v in overrides.items()])
    return module, cfg


def side_toolkit(overrides, out, workdir):
    sys.path.insert(0, str(REPO))
    import launch

    status = launch.main([str(RECIPE), *(f"{k}={v}" for k, v in overrides.items()), f"output_dir={workdir}"])
    assert status == 0, status
    (run,) = Path(workdir).glob("hf_classify/*")
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in train if r["split"] == "train"]
    seconds = sum(r["samples"] / r["samples_per_s"] for r in windows)
    final = json.loads((run / "summary.json").read_text())["val"]
    return sum(r["samples"] for r in windows) / seconds, final["accuracy"]


def side_trainer(overrides, out, workdir):
    import torch
    from transformers import Trainer, TrainingArguments

    module, cfg = load_recipe(overrides)
    splits = module.datasets(cfg)
    torch.manual_seed(cfg.seed)
    model = module.model(cfg)
    arguments = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        num_train_epochs=cfg.epochs, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        lr_scheduler_type="linear", warmup_steps=cfg.sched.warmup_steps, seed=cfg.seed, report_to=[],
        save_strategy="no", eval_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        bf16=cfg.precision == "bf16", use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    collate = lambda batch: module.collate(batch, cfg)  # noqa: E731 - DataCollatorWithPadding of the tokenizer

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=arguments, train_dataset=splits["train"], eval_dataset=splits["val"],
                      data_collator=collate, compute_metrics=accuracy)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return len(splits["train"]) * cfg.epochs / seconds, trainer.evaluate()["eval_accuracy"]


def hand_written(cfg, module, splits, model):
    """What the hand-written loops share: their DataLoaders, AdamW without decay on biases and norms,
    and the linear schedule after warmup."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    collate = lambda batch: module.collate(batch, cfg)  # noqa: E731
    train = DataLoader(splits["train"], shuffle=True, collate_fn=collate, batch_size=cfg.batch_size)
    val = DataLoader(splits["val"], shuffle=False, collate_fn=collate, batch_size=cfg.eval_batch_size)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.optim.lr)
    schedule = get_linear_schedule_with_warmup(optimizer, cfg.sched.warmup_steps, len(train) * cfg.epochs)
    return train, val, optimizer, schedule


def train_and_evaluate(cfg, model, train, val, optimizer, schedule, backward, gather):
    """The loop both hand-written sides run: (training samples/s, val accuracy)."""
    import torch

    start, samples = time.perf_counter(), 0
    for _ in range(cfg.epochs):
        model.train()
        for batch in train:
            loss = model(**batch).loss
            backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            samples += len(batch["labels"])
    seconds = time.perf_counter() - start
    model.eval()
    correct = total = 0
    for batch in val:
        with torch.no_grad():
            predictions = model(**batch).logits.argmax(-1)
        predictions, labels = gather((predictions, batch["labels"]))
        correct += (predictions == labels).sum().item()
        total += len(labels)
    return samples / seconds, correct / total


def side_accelerate(overrides, out, workdir):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    module, cfg = load_recipe(overrides)
    accelerator = Accelerator(mixed_precision=cfg.precision or "no")
    set_seed(cfg.seed)
    splits = module.datasets(cfg)
    model = module.model(cfg)
    train, val, optimizer, schedule = hand_written(cfg, module, splits, model)
    model, optimizer, train, val, schedule = accelerator.prepare(model, optimizer, train, val, schedule)
    return train_and_evaluate(cfg, model, train, val, optimizer, schedule, accelerator.backward,
                              accelerator.gather_for_metrics)


def side_fabric(overrides, out, workdir):
    from lightning.fabric import Fabric

    module, cfg = load_recipe(overrides)
    fabric = Fabric(devices=1, precision="bf16-mixed" if cfg.precision == "bf16" else "32-true")
    fabric.seed_everything(cfg.seed, verbose=False)
    splits = module.datasets(cfg)
    model = module.model(cfg)
    train, val, optimizer, schedule = hand_written(cfg, module, splits, model)
    model, optimizer = fabric.setup(model, optimizer)
    train, val = fabric.setup_dataloaders(train, val)
    return train_and_evaluate(cfg, model, train, val, optimizer, schedule, fabric.backward, lambda tensors: tensors)


# ---------------------------------------------------------------------------------------------
# The rounds

def run_side(name, args):
    """Run one side in a fresh process; (its samples/s, accuracy, wall s, CPU s of the process)."""
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO),
               "HF_DATASETS_CACHE": str(Path(workdir) / "hf"), "TOKENIZERS_PARALLELISM": "false"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--side", name, "--out", str(out),
                               "--settings", json.dumps(settings(args))], env=env, cwd=workdir,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        return result["samples_per_s"], result["accuracy"], wall, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--lines", type=int, default=12000, help="lines of text (train 90%%)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--peers", default=",".join(PEERS[1:]))
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # one side, in its own process
        with tempfile.TemporaryDirectory() as workdir:
            rate, accuracy = globals()[f"side_{args.side}"](json.loads(args.settings), args.out, workdir)
        Path(args.out).write_text(json.dumps({"samples_per_s": rate, "accuracy": accuracy}))
        return
    sides = ["toolkit", *args.peers.split(",")]
    print(f"{args.pairs} rounds of {', '.join(sides)}; {args.threads} threads; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"{'round':>5} {'side':>10} {'samples/s':>10} {'accuracy':>8} {'wall s':>7} {'CPU s':>6}")
    results = {side: [] for side in sides}
    for i in range(args.pairs):
        for side in sides:
            rate, accuracy, wall, cpu = run_side(side, args)
            results[side].append(rate)
            print(f"{i + 1:>5} {side:>10} {rate:>10.0f} {accuracy:>8.4f} {wall:>7.1f} {cpu:>6.1f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    for peer in sides[1:]:
        ratios = [a / b for a, b in zip(results["toolkit"], results[peer])]
        print(f"toolkit / {peer}: median {statistics.median(ratios):.3f} "
              f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
