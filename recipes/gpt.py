"""A small GPT (nanoGPT's architecture), byte-level, on the Python standard library's own sources.

    python launch.py recipes/gpt.py                           # 221 steps on 1 MB of text: 3.14 val bits per byte
    python launch.py recipes/gpt.py data.source=shakespeare   # downloads tiny-shakespeare into data/
    python launch.py recipes/gpt.py precision=bf16 compile=true data.max_bytes=0 n_layer=6 n_embd=384 block_size=256

Bytes are the tokens (vocabulary 256), so nothing needs a tokenizer or a download: the default text
is the `.py` files of the standard library of the Python that runs it (31 MB for Python 3.11).
The defaults train in minutes on a CPU (9 to 11 on 2 cores that other jobs kept busy). On a
GPU, use `precision=bf16 compile=true`, with a larger model and all the text (the last line).

Samples are chunks of up to block_size + 1 bytes cut from each file separately, so a file's last
chunk is shorter; `collate` pads a batch to its longest chunk and the loss is the mean over the
real (non-pad) target bytes. `loss_per: tokens` tells the toolkit so: it then weights every
micro-batch and process by its `tokens` count, which makes an optimizer step's gradient that of
the whole step's tokens. `metrics` reports bits per byte from the summed NLL.
"""

import math
import os
import sysconfig
import zlib
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from toolkit import UserError

config = {
    "data": {
        "source": "stdlib",    # stdlib (offline) | shakespeare | an http(s) URL of a text file (downloaded to root)
        "root": "data",        # where downloaded corpora are kept
        "max_bytes": 1_000_000,  # use at most this much text (90% train, 5% val, 5% test); 0: all of it
    },
    "n_layer": 4,              # transformer blocks
    "n_head": 4,               # attention heads per block; n_embd must divide by it
    "n_embd": 128,             # width of the residual stream; head size = n_embd / n_head
    "block_size": 128,         # context length in bytes; the longest sample is block_size + 1 bytes
    "dropout": 0.0,            # on attention, residual branches and embeddings; 0 for short runs
    "epochs": 1,               # one pass over 0.9 MB of training text: 221 steps
    "batch_size": 32,          # chunks per process and micro-batch: up to 4,096 target bytes
    "optim": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]},  # nanoGPT's AdamW settings for small models
    "sched": {"name": "cosine", "warmup_steps": 50, "min_lr": 0.1},  # warm up over 50 steps, end at lr / 10
    "clip_grad_norm": 1.0,     # as GPT-2 and nanoGPT: the first steps' gradients are large
    "loss_per": "tokens",      # the loss is a mean over counts["tokens"] (non-pad targets), not over samples
    "log_every": 25,           # 8 train windows an epoch
    "checkpoint": {"monitor": "val/bpb", "mode": "min"},  # keep the weights with the fewest val bits per byte
}

CORPORA = {  # data.source name -> URL of one plain text file
    "shakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}
SHARES = {"train": 0.90, "val": 0.05, "test": 0.05}  # of the text, and of data.max_bytes
PAD = -100  # the target at a padded position: F.cross_entropy's default ignore_index


def datasets(cfg):
    source = cfg.data.source
    if source == "stdlib":
        documents = {split: map(Path.read_bytes, files) for split, files in stdlib_files().items()}  # read as needed
    elif source in CORPORA or source.startswith(("http://", "https://")):
        documents = corpus(source, Path(cfg.data.root))
    else:
        raise UserError(f"data.source={source!r}: expected stdlib, {', '.join(CORPORA)} or an http(s) URL of a "
                        f"text file")
    splits = {}
    for split, docs in documents.items():
        budget = max(1, round(SHARES[split] * cfg.data.max_bytes)) if cfg.data.max_bytes else 0
        splits[split] = Chunks(take(docs, budget), cfg.block_size)
        if not len(splits[split]):
            raise UserError(f"the {split} split holds no sample (2 bytes or more) of data.source={source} with "
                            f"data.max_bytes={cfg.data.max_bytes}; raise data.max_bytes (0: all the text)")
    return splits


def stdlib_files():
    """The standard library's .py files as {split: [path]}, in the sorted order of their paths.

    A file's split is a hash of its path inside the library: fixed, whatever data.max_bytes is,
    and no file is in two splits. Installed packages (site-packages) are not part of it, and are
    not even walked (10,000+ files: a second)."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in ("site-packages", "dist-packages", "__pycache__")]
        paths += [os.path.relpath(os.path.join(folder, name), root) for name in files if name.endswith(".py")]
    if not paths:
        raise UserError(f"no .py files in {root} (the standard library of this Python); use "
                        f"data.source=shakespeare or a URL")
    splits = {split: [] for split in SHARES}
    for path in sorted(Path(path).as_posix() for path in paths):
        bucket = zlib.crc32(path.encode()) % 20  # 1 in 20 files each for val and test
        splits["val" if bucket == 0 else "test" if bucket == 1 else "train"].append(Path(root, path))
    return splits


def corpus(source, root):
    """One downloaded text file, cut into its first 90% (train), next 5% (val) and last 5% (test)."""
    url = CORPORA.get(source, source)
    path = root / (f"{source}.txt" if source in CORPORA else Path(urlparse(url).path).name or "corpus.txt")
    if not path.is_file():
        # Only the main process gets here first (the toolkit calls datasets() inside
        # main_process_first()); download_url_to_file writes a temporary file and renames it.
        root.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as e:  # noqa: BLE001 - any failure is reported with its reason
            reason = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            raise UserError(f"data.source={source}: cannot download {url} into {root} ({reason[-1].strip()}); "
                            f"put the file there as {path.name}, or use data.source=stdlib offline") from None
    text = path.read_bytes()
    cut1, cut2 = round(SHARES["train"] * len(text)), round((SHARES["train"] + SHARES["val"]) * len(text))
    return {"train": [text[:cut1]], "val": [text[cut1:cut2]], "test": [text[cut2:]]}


def take(documents, budget):
    """The first documents up to `budget` bytes in all (the last one cut short); all if budget is 0."""
    if not budget:
        return list(documents)
    taken = []
    for document in documents:
        taken.append(document[:budget])
        budget -= len(taken[-1])
        if not budget:
            break
    return taken


class Chunks(torch.utils.data.Dataset):
    """Chunks of up to block_size + 1 bytes, as uint8 tensors, cut from each document separately.

    Chunk k of a document starts at byte k * block_size and overlaps the next one by a byte, so
    every byte but a document's first is a target exactly once; a chunk of a single byte, which
    would hold no target, is left out. The text is one tensor in memory and a chunk is a view of it.
    """

    def __init__(self, documents, block_size):
        self.data = torch.frombuffer(bytearray(b"".join(documents)), dtype=torch.uint8)
        self.starts, self.ends, offset = [], [], 0
        for document in documents:
            for start in range(0, len(document) - 1, block_size):
                self.starts.append(offset + start)
                self.ends.append(offset + min(start + block_size + 1, len(document)))
            offset += len(document)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        return self.data[self.starts[i]:self.ends[i]]


def collate(batch):
    """Chunks -> (inputs, targets), both [batch, longest chunk - 1], padded on the right.

    A padded target is PAD (ignored by the loss); a padded input is byte 0, which no real
    position sees: attention is causal and the pads come after the real bytes."""
    padded = torch.full((len(batch), max(len(chunk) for chunk in batch)), PAD, dtype=torch.long)
    for row, chunk in zip(padded, batch):
        row[:len(chunk)] = chunk
    return padded[:, :-1].clamp(min=0), padded[:, 1:]


def model(cfg):
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd} must be a multiple of n_head={cfg.n_head}")
    return GPT(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout)


class GPT(nn.Module):
    """GPT-2's architecture (Radford et al., 2019), as nanoGPT writes it: learned positions,
    pre-norm blocks, and the output layer tied to the token embedding."""

    def __init__(self, n_layer, n_head, n_embd, block_size, dropout=0.0, vocab_size=256):
        super().__init__()
        self.block_size = block_size
        self.tokens = nn.Embedding(vocab_size, n_embd)
        self.positions = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_head, n_embd, dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                # GPT-2's initialisation: residual projections scaled down by the depth, so the
                # residual stream's variance does not grow with the number of blocks.
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        length = idx.shape[1]
        if length > self.block_size:
            raise ValueError(f"a sequence of {length} tokens is longer than block_size={self.block_size}")
        x = self.drop(self.tokens(idx) + self.positions(torch.arange(length, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        # Tied by using the embedding matrix as the output layer, rather than sharing one Parameter
        # between two modules: the state dict then holds the tensor once, as safetensors requires.
        return F.linear(self.norm(x), self.tokens.weight)


class Block(nn.Module):
    def __init__(self, n_head, n_embd, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_head, n_embd, dropout)
        self.norm2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU())
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.drop(self.proj(self.mlp(self.norm2(x))))


class Attention(nn.Module):
    def __init__(self, n_head, n_embd, dropout):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        # One fused kernel (flash or memory-efficient attention on GPUs) with the causal mask built in.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.drop(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


def optimizer(cfg, model):
    """AdamW; weight decay on every matrix (the Linear weights and both embeddings), none on
    biases and LayerNorm weights.

    The embeddings are decayed as in nanoGPT: the token embedding is also the output layer, a
    matrix like the others. Frozen parameters (`freeze`) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # Fused: one kernel updates every tensor, on CPUs and GPUs (torch >= 2.4). For the default
    # model on one CPU thread, a step takes 5 ms, against 16 ms with foreach or a plain for-loop.
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=True)


def loss(model, batch, cfg):
    inputs, targets = batch
    logits = model(inputs)
    # Summed in float32 over the real targets; F.cross_entropy skips PAD targets.
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD, reduction="sum")
    tokens = (targets != PAD).sum()
    return nll / tokens, {"samples": len(targets), "tokens": tokens, "nll": nll.detach()}


def metrics(totals):
    """Bits per byte: the summed NLL (nats) over every target byte, in bits."""
    return {"bpb": totals["nll"] / totals["tokens"] / math.log(2), "tokens": int(totals["tokens"])}


def flops(cfg, model):
    """Training FLOPs per token (PaLM's estimate, as nanoGPT computes it): 6 per parameter for
    the forward and backward matmuls, plus attention's 12 x n_layer x n_embd x block_size.

    The position embedding is a lookup, not a matmul, so it is not counted; the token embedding
    is, because it is also the output layer. Padded positions are computed but not counted as
    tokens, so MFU from this slightly understates what the hardware did."""
    params = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("positions.weight"))
    return 6 * params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
