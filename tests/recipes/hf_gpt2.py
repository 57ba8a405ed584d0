"""A test recipe: a tiny HF GPT-2 with tied embeddings (its default), built from its config, on the
lines of a standard library file as bytes, from an HF `datasets` stream (or its map-style table).
The loss is a mean over target tokens, declared with loss_per."""

import sysconfig
from pathlib import Path

import torch

config = {
    "stream": True,       # an HF IterableDataset (to_iterable_dataset), or the map-style Dataset
    "lora": 0,            # the rank of a peft LoRA adapter on the attention (0: the whole model trains)
    "shards": 2,          # of the stream
    "lines": 600,         # of the file, at most (train: all but the first 80)
    "max_steps": 12,
    "batch_size": 16,
    "eval_batch_size": 32,
    "loss_per": "tokens",
    "sched": {"name": "constant"},
    "optim": {"lr": 3e-3},
    "trackers": [],
    "log_every": 4,
    "checkpoint": {"monitor": "val/loss", "mode": "min"},
}


def datasets(cfg):
    import datasets as hf

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if len(line.strip()) > 3][:cfg.lines]
    table = hf.Dataset.from_dict({"text": lines}).map(
        lambda e: {"ids": list(e["text"].encode()[:63])}, remove_columns=["text"])
    splits = {"train": table.select(range(80, len(table))), "val": table.select(range(80))}
    if cfg.stream:
        splits = {name: split.to_iterable_dataset(num_shards=cfg.shards) for name, split in splits.items()}
    return splits


def collate(batch):
    width = max(len(sample["ids"]) for sample in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    for row, sample in enumerate(batch):
        ids[row, :len(sample["ids"])] = torch.tensor(sample["ids"])
        labels[row, :len(sample["ids"])] = ids[row, :len(sample["ids"])]
    return {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}


def model(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    net = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=cfg.lora, target_modules=["c_attn"], fan_in_fan_out=True))
    return net


def loss(model, batch, cfg):
    out = model(**batch)
    return out.loss, {"samples": len(batch["input_ids"]), "tokens": (batch["labels"][:, 1:] != -100).sum()}
