"""Fine-tune any `transformers` sequence classifier on a `datasets` dataset: the counterpart of
Accelerate's `nlp_example.py` (BERT on GLUE MRPC), with `pip install -e '.[hf]'`.

    python launch.py recipes/hf_classify.py                                  # bert-base-cased on GLUE MRPC
    python launch.py recipes/hf_classify.py model.name=roberta-base data.config=sst2
    python launch.py recipes/hf_classify.py data.name=csv data.files=reviews/{split}.csv data.text=[review]
    python launch.py recipes/hf_classify.py model.name=tiny data.name=stdlib optim.lr=1e-3  # offline, on a CPU

`model.name` is anything `AutoModelForSequenceClassification.from_pretrained` takes (a hub id or a
folder, such as one that `launch.py export` wrote); `tiny` builds a BERT of `model.layers` x
`model.width` from its config with the byte-level ByT5 tokenizer, so nothing is downloaded. `data.name` is anything `load_dataset` takes,
or `stdlib`: lines of the Python standard library's sources, each labelled prose (a comment, its `#`
removed) or code, which needs no download either.

Tokenized once with `.map(batched=True)` (cached by `datasets`, on the main process first) and
padded per batch by `DataCollatorWithPadding`; the toolkit fetches each batch from Arrow in one call.
`launch.py export RUN OUT` writes the model and its tokenizer, for `from_pretrained(OUT)`.
"""

import functools
import sysconfig
from pathlib import Path

from toolkit import UserError

config = {
    "model": {
        "name": "bert-base-cased",  # a hub id or folder for from_pretrained; tiny: a BERT built from its config
        "max_length": 128,          # tokens per text (pair), longer ones are cut
        "layers": 2,                # tiny: transformer layers
        "width": 64,                # tiny: hidden size (heads of 32), 4x that in the MLP
    },
    "data": {
        "name": "glue",             # load_dataset(name, config); csv/json/parquet with data.files; stdlib: offline
        "config": "mrpc",           # the dataset's configuration ("": none)
        "files": "",                # for csv/json/parquet: a path with {split}, e.g. data/{split}.csv
        "text": [],                 # the text column, or a pair of them ([]: the dataset's string columns)
        "label": "label",           # the integer class column
        "val_split": "validation",  # the split to validate on
        "test_split": "",           # and to test on ("": none; GLUE's test labels are hidden)
        "max_lines": 20000,         # stdlib: lines used (train 90%, val 5%, test 5%)
    },
    "num_labels": 2,
    "epochs": 3,                    # nlp_example.py's settings: 3 epochs of AdamW at 2e-5, linear decay
    "batch_size": 16,
    "eval_batch_size": 64,
    "optim": {"lr": 2e-5, "weight_decay": 0.01},
    "sched": {"name": "linear", "warmup_steps": 100},
    "log_every": 20,
    "checkpoint": {"monitor": "val/accuracy", "mode": "max"},
}


@functools.cache
def tokenizer(name):
    from transformers import AutoTokenizer, ByT5Tokenizer

    return ByT5Tokenizer() if name == "tiny" else AutoTokenizer.from_pretrained(name)


def datasets(cfg):
    raw = stdlib_lines(cfg.data.max_lines) if cfg.data.name == "stdlib" else load(cfg.data)
    tok, features = tokenizer(cfg.model.name), raw["train"].features
    columns = list(cfg.data.text) or [c for c, f in features.items() if getattr(f, "dtype", "") == "string"]
    missing = [c for c in [*columns, cfg.data.label] if c not in raw["train"].column_names]
    if missing or not 1 <= len(columns) <= 2:
        raise UserError(f"data.text={columns} and data.label={cfg.data.label}: expected one or two text columns and "
                        f"a label column of {', '.join(raw['train'].column_names)}")

    def encode(batch):
        encoded = tok(*(batch[c] for c in columns), truncation=True, max_length=cfg.model.max_length)
        return {**encoded, "labels": batch[cfg.data.label]}

    splits = {}
    for split, name in (("train", "train"), ("val", cfg.data.val_split), ("test", cfg.data.test_split)):
        if name:
            table = raw[name].map(encode, batched=True, remove_columns=raw[name].column_names)
            splits[split] = table.with_format("torch")
    return splits


def load(data):
    import datasets as hf

    files = {split: data.files.format(split=split) for split in ("train", data.val_split, data.test_split)
             if split} if data.files else None
    try:
        return hf.load_dataset(data.name, data.config or None, data_files=files)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise UserError(f"data.name={data.name} data.config={data.config}: {e}") from None


def stdlib_lines(max_lines):
    """Lines of the standard library's .py files: comments (label 1, without their #) and code (0)."""
    import datasets as hf

    texts, labels = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if len(line) > 12 and not line.startswith("#!"):
                texts.append(line.lstrip("# ") if line.startswith("#") else line)
                labels.append(int(line.startswith("#")))
        if len(texts) >= max_lines:
            break
    table = hf.Dataset.from_dict({"text": texts[:max_lines], "label": labels[:max_lines]}).shuffle(seed=0)
    n = len(table)
    return {"train": table.select(range(n // 10, n)), "validation": table.select(range(n // 20)),
            "test": table.select(range(n // 20, n // 10))}


def collate(batch, cfg):  # pad each batch to its longest text
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer(cfg.model.name))(batch)


def model(cfg):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if cfg.model.name == "tiny":
        m = cfg.model
        return BertForSequenceClassification(BertConfig(
            vocab_size=len(tokenizer("tiny")), hidden_size=m.width, num_hidden_layers=m.layers,
            num_attention_heads=max(1, m.width // 32), intermediate_size=4 * m.width,
            max_position_embeddings=m.max_length, num_labels=cfg.num_labels))
    return AutoModelForSequenceClassification.from_pretrained(cfg.model.name, num_labels=cfg.num_labels)


def loss(model, batch, cfg):
    out = model(**batch)
    return out.loss, {"samples": len(batch["labels"]), "correct": (out.logits.argmax(-1) == batch["labels"]).sum()}


def metrics(totals):
    return {"accuracy": totals["correct"] / totals["samples"]}


def export(cfg, folder):  # launch.py export: the tokenizer beside the model, for from_pretrained(folder)
    tokenizer(cfg.model.name).save_pretrained(folder)
