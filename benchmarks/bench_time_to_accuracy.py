"""Wall seconds until LeNet first reaches 90% Fashion-MNIST test accuracy, validating after every
epoch on the test split (benchmarks/lenet_val_on_test.py; all 60,000 training images):

  toolkit:      python launch.py benchmarks/lenet_val_on_test.py, with recipes/lenet.py's defaults
                (batch 128, AdamW 5e-3, cosine schedule with warmup, channels_last), measured from
                process start
  hand-written: Adam 1e-3, batch 64, constant LR, tensors in memory, measured from loading the
                data (its python and torch start-up are not counted)

Target: toolkit <= 25 s on 2 CPU cores.     python benchmarks/bench_time_to_accuracy.py
"""

import time

import torch

from common import FASHION_MNIST, LENET, accuracy, fashion_mnist, hand_written_epoch, launch, machine, records, table

TARGET, MAX_EPOCHS = 0.90, 15


def toolkit():
    def reached(run):
        hits = [r for r in records(run, "val") if r["accuracy"] >= TARGET]
        return hits[0] if hits else None

    args = ["benchmarks/lenet_val_on_test.py", "data.name=fashion_mnist", f"data.root={FASHION_MNIST}",
            "data.val_size=0"]  # the recipe's epochs: they size its LR schedule
    seconds, _, hit = launch(args, poll=reached)
    return seconds, hit["epoch"] if hit else None, hit["accuracy"] if hit else None


def hand_written():
    start = time.perf_counter()
    x, y, test_x, test_y = fashion_mnist()
    torch.manual_seed(0)
    model = LENET.model(None)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(1, MAX_EPOCHS + 1):
        hand_written_epoch(model, optimizer, x, y, 64)
        if (acc := accuracy(model, test_x, test_y)) >= TARGET:
            return time.perf_counter() - start, epoch, acc
    return time.perf_counter() - start, None, acc


def main():
    rows = []
    for name, measure in (("toolkit, recipe defaults", toolkit), ("hand-written, Adam 1e-3, batch 64", hand_written)):
        seconds, epoch, acc = measure()
        rows.append([name, f"{seconds:.1f}" if epoch else f"> {seconds:.1f}", epoch or "not reached",
                     f"{acc:.4f}" if acc else "-"])
    print(f"LeNet-5, Fashion-MNIST, seconds to {TARGET:.0%} test accuracy; {machine()}\n")
    table(rows, ["", "seconds", "epoch", "test accuracy"])


if __name__ == "__main__":
    main()
