"""Seconds from process start to the first optimizer step, against importing torch and accelerate:

  python -c "import torch, accelerate"
  python launch.py recipes/lenet.py (Fashion-MNIST from the Debian files)  -> first train log line

The first step is seen from outside: with log_every=1 the run writes its first metrics.jsonl line
right after it. Best of 3 runs each. Target: the toolkit adds < 1.0 s.
    python benchmarks/bench_startup.py
"""

import subprocess
import sys
import time

from common import FASHION_MNIST, launch, machine, records, table

RUNS = 3


def bare_import():
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, accelerate"], check=True)
    return time.perf_counter() - start


def first_step():
    args = ["recipes/lenet.py", "data.name=fashion_mnist", f"data.root={FASHION_MNIST}", "log_every=1",
            "max_steps=2"]
    seconds, _, _ = launch(args, poll=lambda run: records(run, "train"))
    return seconds


def main():
    bare = min(bare_import() for _ in range(RUNS))
    toolkit = min(first_step() for _ in range(RUNS))
    print(f"{machine()}; best of {RUNS}\n")
    table([["python -c 'import torch, accelerate'", f"{bare:.2f}"],
           ["python launch.py recipes/lenet.py, to the first step", f"{toolkit:.2f}"],
           ["added by the toolkit (target < 1.0)", f"{toolkit - bare:.2f}"]], ["", "seconds"])


if __name__ == "__main__":
    main()
