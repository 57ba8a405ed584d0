"""What a stream costs the loader: samples/s of reading an HF `datasets` stream through the toolkit's
`StreamLoader` (as one process of a run reads it), with 0 and 2 DataLoader workers, against the same
stream read by a plain DataLoader; and what a resume deep into a pass costs when the pass is read
again up to the checkpoint's batch (the toolkit's way: a stream cannot seek) against HF's own
`IterableDataset.state_dict()` / `load_state_dict()`.

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

from toolkit.data import StreamLoader  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 40_000
ROUNDS, BATCH = 3, 64


def stream():
    import datasets

    rows = datasets.Dataset.from_dict({"ids": [[i % 251] * 48 for i in range(N)]})
    return rows.to_iterable_dataset(num_shards=4).map(lambda e: {"n": len(e["ids"])}).filter(lambda e: e["n"] > 0)


def collate(batch):
    return torch.tensor([sample["ids"] for sample in batch])


def toolkit(workers):
    one = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    return StreamLoader(stream(), BATCH, workers, collate, one, seed=0, agree=False)


def plain(workers):
    return torch.utils.data.DataLoader(stream(), batch_size=BATCH, num_workers=workers, collate_fn=collate)


def rate(loader):
    """(samples/s, samples read: N when every sample was read once)."""
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += len(batch)
    return samples / (time.perf_counter() - start), samples


def resume_by_reading(batches):
    """Seconds until the first batch after `batches` batches of the pass, read again (0 workers)."""
    start = time.perf_counter()
    next(iter(toolkit(0).skip_first_batches(batches)))
    return time.perf_counter() - start


def resume_by_state(batches):
    """The same with HF's own state: saved after `batches` batches, then loaded into a new stream."""
    ds = stream()
    for i, _ in enumerate(ds.iter(batch_size=BATCH)):
        if i + 1 == batches:
            break
    state = ds.state_dict()
    start = time.perf_counter()
    again = stream()
    again.load_state_dict(state)
    next(iter(again.iter(batch_size=BATCH)))
    return time.perf_counter() - start


def main():
    print(f"{N} samples, batch {BATCH}, median of {ROUNDS} rounds")
    for workers in (0, 2):
        ours, theirs = [], []
        for _ in range(ROUNDS):
            ours.append(rate(toolkit(workers)))
            theirs.append(rate(plain(workers)))
        a, b = statistics.median(r for r, _ in ours), statistics.median(r for r, _ in theirs)
        print(f"{workers} workers: StreamLoader {a:,.0f} samples/s ({ours[0][1]} samples read), plain "
              f"DataLoader {b:,.0f} samples/s ({theirs[0][1]} read), ratio {a / b:.3f}")
    deep = int(0.9 * N / BATCH)
    reading = statistics.median(resume_by_reading(deep) for _ in range(ROUNDS))
    state = statistics.median(resume_by_state(deep) for _ in range(ROUNDS))
    print(f"resume at batch {deep} of {N // BATCH}: reading the pass again {reading:.2f} s, "
          f"HF state_dict {state:.3f} s")


if __name__ == "__main__":
    main()
