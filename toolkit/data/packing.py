"""Sequence packing for token batches: a batch's samples packed into as few rows as fit, each
sample attending to itself alone, so that packing changes the speed (fewer rows, less padding)
and not the loss.

A packed row holds whole samples one after another; their position ids restart at 0 for each, and
no attention mask is given: `transformers` models then attend within each sample only (its
masking finds the samples where position ids restart; the model must run without a KV cache,
`use_cache=False`). The first label of each sample is -100, so that no token is predicted from the
sample before it. The step's samples, tokens and targets are those of the unpacked batch.
"""

import torch


def pack(samples, max_len, pad_id=0):
    """`samples` (dicts of `input_ids` and `labels`, equal-length lists of ints, at most `max_len`
    each) packed first-fit, longest first, into rows of at most `max_len` tokens; returns a batch
    dict of `input_ids`, `labels` and `position_ids`, padded to the longest row (padding: `pad_id`,
    label -100, positions of its own)."""
    rows = []  # [(free tokens, [samples])]
    for sample in sorted(samples, key=lambda s: -len(s["input_ids"])):
        n = len(sample["input_ids"])
        if n > max_len:
            raise ValueError(f"a sample of {n} tokens does not fit a packed row of max_len={max_len}")
        row = next((row for row in rows if row[0] >= n), None)
        if row is None:
            rows.append(row := [max_len, []])
        row[0] -= n
        row[1].append(sample)
    width = max(max_len - free for free, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (free, packed) in enumerate(rows):
        start = 0
        for sample in packed:
            n = len(sample["input_ids"])
            ids[r, start:start + n] = torch.as_tensor(sample["input_ids"])
            labels[r, start + 1:start + n] = torch.as_tensor(sample["labels"][1:])
            positions[r, start:start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # the padding: a sequence of its own
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def padded(samples, pad_id=0):
    """The same samples unpacked, one per row, right-padded to the longest, with an attention mask."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, sample in enumerate(samples):
        n = len(sample["input_ids"])
        ids[r, :n] = torch.as_tensor(sample["input_ids"])
        labels[r, :n] = torch.as_tensor(sample["labels"])
        mask[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
