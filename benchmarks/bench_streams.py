"""What a stream costs the loader: samples/s of reading an HF `datasets` stream through the toolkit's
`StreamLoader` (as one process of a run reads it: for evaluation, and for training, where it keeps
the stream's state after every batch through torchdata's StatefulDataLoader), with 0 and 2
DataLoader workers, against the same stream read by a plain DataLoader; and what a resume deep into
a pass costs when the pass is read again up to the checkpoint's batch against one from the state
that the checkpoint keeps (HF's own `IterableDataset.state_dict()`).

The stream: `N` rows of 48 token ids made by `Dataset.to_iterable_dataset(num_shards=4)`, with a
`.map` and a `.filter`, batches of 64, padded by a collate; nothing trains. ROUNDS rounds of each
side, interleaved; the median is printed.

    python benchmarks/bench_streams.py [N]
"""

import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from toolkit.data.streams import StreamLoader  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 40_000
ROUNDS, BATCH = 3, 64


def stream():
    import datasets

    rows = datasets.Dataset.from_dict({"ids": [[i % 251] * 48 for i in range(N)]})
    return rows.to_iterable_dataset(num_shards=4).map(lambda e: {"n": len(e["ids"])}).filter(lambda e: e["n"] > 0)


def collate(batch):
    return torch.tensor([sample["ids"] for sample in batch])


def toolkit(workers, training=False):
    one = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    return StreamLoader(stream(), BATCH, workers, collate, one, seed=0, agree=training)


def plain(workers):
    return torch.utils.data.DataLoader(stream(), batch_size=BATCH, num_workers=workers, collate_fn=collate)


def rate(loader):
    """(samples/s, samples read: N when every sample was read once)."""
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += len(batch)
    return samples / (time.perf_counter() - start), samples


def resume_by_reading(batches, workers):
    """Seconds until the first batch after `batches` batches of the pass, read again."""
    start = time.perf_counter()
    next(iter(toolkit(workers).skip_first_batches(batches)))
    return time.perf_counter() - start


def resume_by_state(batches, workers):
    """The same from the resume point that a checkpoint after `batches` batches keeps."""
    first = toolkit(workers, training=True)
    for i, _ in enumerate(first):
        if i + 1 == batches:
            break
    point = first.resume_point()
    start = time.perf_counter()
    again = toolkit(workers, training=True)
    again.resume_from(point)
    next(iter(again.skip_first_batches(batches)))
    return time.perf_counter() - start


def main():
    print(f"{N} samples, batch {BATCH}, median of {ROUNDS} rounds")
    for workers in (0, 2):
        ours, training, theirs = [], [], []
        for _ in range(ROUNDS):
            ours.append(rate(toolkit(workers)))
            training.append(rate(toolkit(workers, training=True)))
            theirs.append(rate(plain(workers)))
        a, t, b = (statistics.median(r for r, _ in rates) for rates in (ours, training, theirs))
        print(f"{workers} workers: StreamLoader {a:,.0f} samples/s ({ours[0][1]} samples read), training (with "
              f"its state) {t:,.0f} ({training[0][1]}), plain DataLoader {b:,.0f} ({theirs[0][1]}); "
              f"ratios {a / b:.3f}, {t / b:.3f}")
    deep = int(0.9 * N / BATCH)
    for workers in (0, 2):
        reading = statistics.median(resume_by_reading(deep, workers) for _ in range(ROUNDS))
        state = statistics.median(resume_by_state(deep, workers) for _ in range(ROUNDS))
        print(f"{workers} workers, resume at batch {deep} of {N // BATCH}: reading the pass again {reading:.2f} s, "
              f"from the stream's state {state:.3f} s")


if __name__ == "__main__":
    main()
