"""A test recipe on MosaicML's `StreamingDataset`: points in MDS shards (`write` makes them), a
linear classifier. The toolkit reads Mosaic's streams by index; building one calls collectives, so
every process runs datasets() at once (datasets_together)."""

import numpy as np
import torch
import torch.nn.functional as F

config = {
    "data_dir": "",  # what write() filled: train/ and test/
    "datasets_together": True,
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
    """Each split's points as MDS shards of about 700 bytes (several per split)."""
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    for split, n in SIZES.items():
        with MDSWriter(out=f"{folder}/{split}", columns={"x": "ndarray:float32:4", "y": "int"}, size_limit=700) as w:
            for _ in range(n):
                x = rng.standard_normal(4).astype(np.float32)
                w.write({"x": x, "y": int(x.sum() > 0)})


def datasets(cfg):
    from streaming import StreamingDataset

    return {split: StreamingDataset(local=f"{cfg.data_dir}/{split}", shuffle=split == "train", batch_size=16)
            for split in SIZES}


def collate(batch, cfg):
    """Mosaic's arrays are read-only views of its shards: copied into the batch."""
    return {"x": torch.tensor(np.stack([sample["x"] for sample in batch])),
            "y": torch.tensor([sample["y"] for sample in batch])}


def model(cfg):
    return torch.nn.Linear(4, 2)


def loss(model, batch, cfg):
    logits = model(batch["x"])
    y = batch["y"]
    counts = {"samples": len(y), "correct": (logits.argmax(1) == y).sum()}
    return F.cross_entropy(logits, y), counts


def metrics(totals):
    return {"accuracy": totals["correct"] / totals["samples"]}
