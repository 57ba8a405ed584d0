"""Wall time per trial of a search of many short trials: trials forked from the search's
pre-imported forkserver (what a search on CPUs does without a launcher) against a fresh interpreter
per trial (what `--launcher` gives, here `--launcher <this python>`, the same command otherwise).

The trials train tests/recipes/line.py (one weight, 3 epochs of 8 steps, a validation per epoch):
their time is mostly start-up. One trial at a time, no pruning; PAIRS searches of each kind,
interleaved; the median.

    python benchmarks/bench_search.py [TRIALS]
"""

import statistics
import subprocess
import sys
import tempfile
import time

from common import REPO, machine

TRIALS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
PAIRS = 3


def search(fresh):
    """Seconds per trial of one search of TRIALS trials."""
    with tempfile.TemporaryDirectory(prefix="bench-search-") as out:
        command = [sys.executable, str(REPO / "launch.py"), "search", str(REPO / "tests" / "recipes" / "line.py"),
                   "optim.lr=loguniform(1e-3,0.3)", f"output_dir={out}", "--trials", str(TRIALS), "--pruner", "none",
                   *(["--launcher", sys.executable] if fresh else [])]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return (time.perf_counter() - start) / TRIALS


def main():
    forked, fresh = [], []
    for _ in range(PAIRS):
        forked.append(search(fresh=False))
        fresh.append(search(fresh=True))
    a, b = statistics.median(forked), statistics.median(fresh)
    print(f"{machine()}; {TRIALS} trials per search, median of {PAIRS} searches each\n")
    print(f"forked trials: {a:.2f} s per trial; a fresh interpreter per trial: {b:.2f} s; ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
