"""What each process holds under DDP, FSDP2 and DeepSpeed ZeRO-3: recipes/gpt.py at a larger width
(a few million parameters), a few AdamW steps in bf16 (or fp32) on 2 CPU processes through the launch configs a GPU
job uses, then the bytes of parameters, gradients and optimizer state in each process (distinct
tensor storages, so a view is counted once) and its peak resident memory.

    python benchmarks/bench_memory.py [--n_embd 384] [--n_layer 6] [--steps 3] [--precision bf16|no]

The last line is `per-process state bytes, ZeRO-3 / DDP: R`, after the FSDP2 ratio. Each process
runs `distributed.start_processes` and `accelerator_options`, as a training run does.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import REPO, free_port, machine, table

CONFIGS = REPO / "accelerate_configs"
STRATEGIES = {  # name: (accelerate launch's arguments, extra environment)
    "DDP": (["--config_file", CONFIGS / "multi_gpu.yaml"], {"ACCELERATE_USE_CPU": "1"}),
    "FSDP2": (["--config_file", CONFIGS / "fsdp.yaml"], {}),
    "ZeRO-3": (["--config_file", CONFIGS / "deepspeed.yaml", "--zero_stage", "3"], {}),
}


def main():
    args = parse()
    if args.worker:
        return worker(args)
    rows, totals = [], {}
    for name, (launch_args, env) in STRATEGIES.items():
        out = Path(tempfile.mkdtemp(prefix="bench-memory-"))
        command = [sys.executable, "-m", "accelerate.commands.launch", *map(str, launch_args), "--num_processes", "2",
                   "--main_process_port", str(free_port()), __file__, "--worker", str(out), *sys.argv[1:]]
        env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        found = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
        if done.returncode or len(found) != 2:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        for rank in sorted(found, key=lambda r: r["rank"]):
            state = rank["parameters"] + rank["gradients"] + rank["optimizer"]
            rows.append([name, rank["rank"], rank["banner"], mb(rank["parameters"]), mb(rank["gradients"]),
                         mb(rank["optimizer"]), mb(state), f"{rank['peak_rss'] / 2**30:.2f}"])
        totals[name] = max(r["parameters"] + r["gradients"] + r["optimizer"] for r in found)
    print(machine())
    print(f"recipes/gpt.py n_layer={args.n_layer} n_embd={args.n_embd}, {found[0]['numel']:,} parameters, "
          f"AdamW, precision {args.precision}, {args.steps} steps, 2 processes")
    table(rows, ["strategy", "rank", "banner", "parameters MB", "gradients MB", "optimizer MB", "state MB",
                 "peak RSS GB"])
    print(f"per-process state bytes, FSDP2 / DDP: {totals['FSDP2'] / totals['DDP']:.2f}")
    print(f"per-process state bytes, ZeRO-3 / DDP: {totals['ZeRO-3'] / totals['DDP']:.2f}")


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="bf16", choices=["no", "bf16"], help="as large models train: bf16")
    p.add_argument("--worker", metavar="FOLDER", help=argparse.SUPPRESS)  # a process of a run: its results go there
    return p.parse_args()


def worker(args):
    from accelerate import Accelerator

    from toolkit import config, distributed, recipe
    from toolkit.optim import make_optimizer

    gpt = recipe.load(REPO / "recipes" / "gpt.py")
    overrides = [f"n_embd={args.n_embd}", f"n_layer={args.n_layer}", "batch_size=8", f"precision={args.precision}"]
    cfg = config.resolve(gpt.config, [], overrides)
    processes, cpu = distributed.start_processes(cfg)
    accelerator = Accelerator(mixed_precision=cfg.precision, **distributed.accelerator_options(cfg, cpu))
    torch.manual_seed(0)
    model = gpt.model(cfg)
    numel = sum(p.numel() for p in model.parameters())
    optimizer, _ = make_optimizer(cfg, model, gpt)
    model, optimizer = accelerator.prepare(model, optimizer)
    distributed.finish_prepare(accelerator, model)
    tokens = torch.randint(0, 256, (cfg.batch_size, cfg.block_size + 1))
    for step in range(args.steps + 1):
        loss, _ = gpt.loss(model, (tokens[:, :-1], tokens[:, 1:]), cfg)
        accelerator.backward(loss)
        if step < args.steps:  # the last backward's gradients stay, to be counted
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    held = holdings(model, optimizer, distributed.kind(accelerator))
    result = {"rank": accelerator.process_index, "banner": distributed.describe(accelerator), "numel": numel, **held,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (Path(args.worker) / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def holdings(model, optimizer, strategy):
    """Bytes of the distinct storages of the parameters this process holds (a DTensor's local
    shard, ZeRO-3's partition), their gradients, and the optimizer's state and master weights."""
    seen = set()

    def size(tensors):
        total = 0
        for t in tensors:
            if t is None or not t.numel():
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    net = model.module if strategy in ("DDP", "DeepSpeed") else model
    params = [local(getattr(p, "ds_tensor", p)) for p in net.parameters()]
    grads = [local(p.grad) for p in net.parameters()]
    inner = optimizer.optimizer  # Accelerate's wrapper
    state = [local(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    masters = []
    if strategy == "DeepSpeed":  # ZeRO-3: its flat fp32 partitions, their gradients, Adam's state over them
        zero = inner
        grads += [getattr(zero, "grad_partitions_flat_buffer", None)]
        masters += list(getattr(zero, "fp32_partitioned_groups_flat", []))
        state = [v for s in zero.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"parameters": size(params), "gradients": size(grads), "optimizer": size(state + masters)}


def local(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def mb(n):
    return f"{n / 2**20:.1f}"


if __name__ == "__main__":
    main()
