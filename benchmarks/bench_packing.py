"""What packing buys: tokens/s of recipes/lora_lm.py in its offline tiny mode (a small Llama with a
LoRA adapter, on chats from the standard library's docstrings) with data.pack=false (each batch
padded to its longest sample) and data.pack=true (its samples packed into rows of max_len tokens,
each attending to itself), and how far apart their loss curves are: the same samples and targets
at every step, so only float rounding may differ.

ROUNDS pairs, interleaved; the median of each side's per-window tokens/s (after the first two
windows) and the ratio of the medians are printed, and the largest relative difference between the
two runs' train losses, step by step.

    python benchmarks/bench_packing.py [ROUNDS]
"""

import statistics
import sys

from common import REPO, launch, machine, records, table

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
ARGS = [str(REPO / "recipes" / "lora_lm.py"), "model.name=tiny", "data.name=stdlib", "optim.lr=3e-3",
        "max_steps=30", "log_every=1", "batch_size=16", "data.max_len=256", "trackers=[]", "val_every=0"]


def run(pack):
    _, folder, _ = launch([*ARGS, f"data.pack={str(pack).lower()}"])
    train = records(folder, "train")
    return statistics.median(r["tokens_per_s"] for r in train[2:]), [r["loss"] for r in train]


def main():
    rates, apart = {False: [], True: []}, 0.0
    for _ in range(ROUNDS):
        curves = {}
        for pack in (False, True):
            rate, curves[pack] = run(pack)
            rates[pack].append(rate)
        apart = max(apart, *(abs(a - b) / abs(a) for a, b in zip(curves[False], curves[True])))
    padded, packed = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"{machine()}; median of {ROUNDS} interleaved pairs, 30 steps of 16 samples each\n")
    table([["padded to the batch's longest", f"{padded:,.0f}"], ["packed into rows of 256", f"{packed:,.0f}"]],
          ["", "tokens/s"])
    print(f"\nlargest relative difference of the train losses, step by step: {apart:.1e}")
    print(f"tokens/s, packed / padded: {packed / padded:.2f}")


if __name__ == "__main__":
    main()
