"""What per-sample seeding costs: samples/s of an ImageFolder pipeline with and without it.

The data: 6,000 Fashion-MNIST images written as PNG files in class folders, read by torchvision's
ImageFolder with RandomCrop(28, padding=2) + RandomHorizontalFlip + ToTensor per sample, through a
DataLoader with 2 workers and batch 64 (persistent workers, as the toolkit makes them):

  (a) plain: the dataset as it is (what a hand-written loop does)
  (b) seeded: wrapped in toolkit.data.mapstyle.SeededSamples, which seeds torch, numpy and `random` before
      each sample from (seed, epoch, index), as the loop does for every map-style dataset

Data loading alone, no training step: the worst case, as a model's step would hide part of it.
Interleaved pairs of epochs, after one warm-up epoch each; prints the median of the pairs'
ratios b/a. Target: b/a >= 0.97.     python benchmarks/bench_seeding.py [--pairs 7]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import datasets, transforms

from common import FASHION_MNIST, REPO  # noqa: F401 - puts the repository on sys.path
from toolkit.data.mapstyle import SeededSamples
from toolkit.data.readers import load_mnist

IMAGES, BATCH, WORKERS = 6000, 64, 2


def image_folder(root):
    raw = load_mnist("fashion_mnist", FASHION_MNIST, download=False)
    images, labels = raw["train"]
    for i in range(IMAGES):
        folder = Path(root) / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].numpy()).save(folder / f"{i}.png")
    augment = transforms.Compose([transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor()])
    return datasets.ImageFolder(root, augment)


def loader(dataset):
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                       persistent_workers=True, generator=torch.Generator().manual_seed(0))


def epoch(batches, dataset, number):
    if isinstance(dataset, SeededSamples):
        dataset.set_epoch(number)
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in batches)
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=7)
    pairs = parser.parse_args().pairs
    with tempfile.TemporaryDirectory() as root:
        plain = image_folder(root)
        seeded = SeededSamples(plain, seed=0)
        loaders = {"plain": loader(plain), "seeded": loader(seeded)}
        for name, batches in loaders.items():  # start the workers, warm the file cache
            epoch(batches, seeded if name == "seeded" else plain, 0)
        rates = {"plain": [], "seeded": []}
        for number in range(1, pairs + 1):
            order = ("plain", "seeded") if number % 2 else ("seeded", "plain")  # neither always goes first
            for name in order:
                rates[name].append(epoch(loaders[name], seeded if name == "seeded" else plain, number))
    ratios = [s / p for s, p in zip(rates["seeded"], rates["plain"])]
    print(f"ImageFolder, RandomCrop + flip, {WORKERS} workers, batch {BATCH}, {IMAGES} images, {pairs} pairs")
    for name, values in rates.items():
        print(f"  {name:7} samples/s: median {statistics.median(values):,.0f}  "
              f"({', '.join(f'{v:,.0f}' for v in values)})")
    print(f"  seeded / plain: median {statistics.median(ratios):.3f}  (pairs: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
