"""A test recipe on litdata's `StreamingDataset`: points in litdata's optimized chunks (`write`
makes them), a linear classifier. The toolkit reads litdata's streams by index."""

import torch
import torch.nn.functional as F

config = {
    "data_dir": "",  # what write() filled: train/ and test/
    "batch_size": 16,
    "eval_batch_size": 24,
    "epochs": 2,
    "sched": {"name": "constant"},
    "optim": {"lr": 0.05},
    "checkpoint": {"monitor": ""},
    "trackers": [],
}
SIZES = {"train": 203, "test": 101}  # neither divides into whole batches


def write(folder):
    """Each split's points as litdata's chunks of about 700 bytes (several per split)."""
    from litdata.streaming.writer import BinaryWriter

    g = torch.Generator().manual_seed(0)
    for split, n in SIZES.items():
        writer = BinaryWriter(f"{folder}/{split}", chunk_bytes=700)
        for i in range(n):
            x = torch.randn(4, generator=g)
            writer[i] = {"index": i, "x": x, "y": int(x.sum() > 0)}
        writer.done()
        writer.merge()


def datasets(cfg):
    import litdata

    return {split: litdata.StreamingDataset(f"{cfg.data_dir}/{split}", shuffle=split == "train")
            for split in SIZES}


def model(cfg):
    return torch.nn.Linear(4, 2)


def loss(model, batch, cfg):
    logits = model(batch["x"])
    y = batch["y"]
    counts = {"samples": len(y), "correct": (logits.argmax(1) == y).sum()}
    return F.cross_entropy(logits, y), counts


def metrics(totals):
    return {"accuracy": totals["correct"] / totals["samples"]}
