"""Seconds from process start to the first optimizer step, against importing torch and accelerate,
and against a hand-written Accelerate program that does the same work up to its first step:

  python -c "import torch, accelerate"
  a hand-written first step: import torch and accelerate, the LeNet recipe's datasets() and model()
      (Fashion-MNIST from the Debian files, decoded and normalised), AdamW, Accelerator().prepare,
      one batch of 128 through forward, backward and step
  python launch.py recipes/lenet.py (the same data)  -> first train log line

The toolkit's first step is seen from outside: with log_every=1 the run writes its first
metrics.jsonl line right after it. Best of 3 runs each. Target: the toolkit adds < 1.0 s to the
import; what it adds to the hand-written program is its own cost (config, run folder and files,
banner, the sanity validation, the loaders).
    python benchmarks/bench_startup.py
"""

import subprocess
import sys
import time

from common import FASHION_MNIST, REPO, launch, machine, records, table

RUNS = 3


def bare_import():
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, accelerate"], check=True)
    return time.perf_counter() - start


HAND_WRITTEN = f"""
import sys
import torch, accelerate
import torch.nn.functional as F
sys.path.insert(0, {str(REPO)!r})
from toolkit import config, recipe
lenet = recipe.load({str(REPO / "recipes" / "lenet.py")!r})
cfg = config.resolve(lenet.config, overrides=["data.name=fashion_mnist", "data.root={FASHION_MNIST}"])
train = lenet.datasets(cfg)["train"]
model = lenet.model(cfg)
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
accelerator = accelerate.Accelerator(cpu=True)
model, optimizer = accelerator.prepare(model, optimizer)
x, y = train.__getitems__(list(range(128)))
loss = F.cross_entropy(model(x), y)
accelerator.backward(loss)
optimizer.step()
"""


def hand_written():
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", HAND_WRITTEN], check=True, cwd=REPO)
    return time.perf_counter() - start


def first_step():
    args = ["recipes/lenet.py", "data.name=fashion_mnist", f"data.root={FASHION_MNIST}", "log_every=1",
            "max_steps=2"]
    seconds, _, _ = launch(args, poll=lambda run: records(run, "train"))
    return seconds


def main():
    bare, peer, toolkit = [], [], []
    for _ in range(RUNS):  # interleaved, so that a busy spell hits all three
        bare.append(bare_import())
        peer.append(hand_written())
        toolkit.append(first_step())
    bare, peer, toolkit = min(bare), min(peer), min(toolkit)
    print(f"{machine()}; best of {RUNS}\n")
    table([["python -c 'import torch, accelerate'", f"{bare:.2f}"],
           ["a hand-written Accelerate program, to its first step", f"{peer:.2f}"],
           ["python launch.py recipes/lenet.py, to the first step", f"{toolkit:.2f}"],
           ["added by the toolkit to the import (target < 1.0)", f"{toolkit - bare:.2f}"],
           ["added by the toolkit to the hand-written program", f"{toolkit - peer:.2f}"]], ["", "seconds"])


if __name__ == "__main__":
    main()
