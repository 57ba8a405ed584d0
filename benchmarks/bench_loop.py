"""Samples/s of LeNet on Fashion-MNIST (batch 64, Adam 1e-3), in one run:

  (a)  the toolkit: python launch.py recipes/lenet.py (in-memory TensorDataset, prepared loader,
       the recipe's channels_last)
  (a0) the same with channels_last=false: the toolkit's overhead, compared with (b)
  (b)  a minimal hand-written loop slicing batches from tensors in memory
  (c)  the usual pipeline: torchvision FashionMNIST + ToTensor/Normalize per sample + DataLoader,
       with num_workers=0 (the fastest setting here) and 2 (Accelerate's examples use workers)

Each for one epoch (60,000 samples) and for its first 300 steps, from a fresh model (the first
steps are slower), best of two interleaved runs.
Training time only: data decoding, model building and process start-up are not counted
(bench_startup measures those).
Targets: a0/b >= 0.95, a/c >= 2.0.     python benchmarks/bench_loop.py
"""

import gzip
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import FASHION_MNIST, LENET, fashion_mnist, hand_written_epoch, launch, machine, records, table

BATCH, LR, STEPS = 64, 1e-3, 300


def toolkit(*extra):
    common = ["recipes/lenet.py", "data.name=fashion_mnist", f"data.root={FASHION_MNIST}", "data.val_size=0",
              f"batch_size={BATCH}", "optim.name=adam", f"optim.lr={LR}", "sched.name=constant",
              "sched.warmup_epochs=0", "val_every=0", "checkpoint.every_epochs=0", "checkpoint.monitor=",
              "trackers=[]", "limit_batches.test=1", "epochs=1", f"log_every={STEPS}", *extra]
    _, run, _ = launch(common)
    windows = records(run, "train")
    epoch = sum(w["samples"] for w in windows) / sum(w["samples"] / w["samples_per_s"] for w in windows)
    return epoch, windows[0]["samples_per_s"]


def hand_written(x, y):
    torch.manual_seed(0)
    model = LENET.model(None)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    seen, marked, seconds = hand_written_epoch(model, optimizer, x, y, BATCH, mark=STEPS)
    return seen / seconds, STEPS * BATCH / marked


def torchvision_pipeline(num_workers):
    import torchvision
    from torchvision import transforms

    root = Path(tempfile.mkdtemp(prefix="bench-tv-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in Path(FASHION_MNIST).glob("*.gz"):  # torchvision wants them unpacked, in its layout
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    dataset = torchvision.datasets.FashionMNIST(str(root), train=True, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=num_workers,
                                         persistent_workers=num_workers > 0)
    torch.manual_seed(0)
    model = LENET.model(None)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    model.train()
    seen, start = 0, time.perf_counter()
    for step, (images, labels) in enumerate(loader):  # with workers: includes their start
        if step == STEPS:
            marked = time.perf_counter() - start
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    epoch, steps = seen / (time.perf_counter() - start), STEPS * BATCH / marked
    shutil.rmtree(root)
    return epoch, steps


def main():
    x, y, _, _ = fashion_mnist()
    results = {}
    for _ in range(2):  # best of 2, interleaved: noise on a shared machine only ever slows things down
        for name, measure, args in (("a", toolkit, ()), ("a0", toolkit, ("channels_last=false",)),
                                    ("b", hand_written, (x, y)), ("c", torchvision_pipeline, (0,)),
                                    ("c2", torchvision_pipeline, (2,))):
            epoch, steps = measure(*args)
            old = results.get(name, (0, 0))
            results[name] = (max(old[0], epoch), max(old[1], steps))
    a, a0, b, c, c2 = (results[k] for k in ("a", "a0", "b", "c", "c2"))
    print(f"LeNet, Fashion-MNIST, batch {BATCH}, Adam {LR}; {machine()}; best of 2 interleaved runs\n")
    rows = [[name, f"{epoch:,.0f}", f"{steps:,.0f}"] for name, (epoch, steps) in (
        ("(a)  toolkit, launch.py", a), ("(a0) toolkit, channels_last=false", a0),
        ("(b)  hand-written, tensors in memory", b), ("(c)  torchvision + DataLoader, 0 workers", c),
        ("(c2) torchvision + DataLoader, 2 workers", c2))]
    for name, (p, q), target in (("a0 / b", (a0, b), ">= 0.95"), ("a / b", (a, b), ""),
                                 ("a / c", (a, c), ">= 2.0"), ("a / c2", (a, c2), "")):
        rows.append([f"{name}  {f'(target {target})' if target else ''}", f"{p[0] / q[0]:.2f}", f"{p[1] / q[1]:.2f}"])
    table(rows, ["samples/s", "one epoch", f"first {STEPS} steps"])


if __name__ == "__main__":
    main()
