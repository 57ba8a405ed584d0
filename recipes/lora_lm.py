"""LoRA fine-tuning of any `transformers` causal LM on a `datasets` text or chat dataset: the
counterpart of trl's SFT example, in one file, with `pip install -e '.[hf]'` (peft).

    python launch.py recipes/lora_lm.py                                        # Qwen2.5-0.5B-Instruct on Capybara
    python launch.py recipes/lora_lm.py model.name=meta-llama/Llama-3.2-1B lora.r=32 data.pack=true
    python launch.py recipes/lora_lm.py data.name=json data.files=chats/{split}.jsonl
    python launch.py recipes/lora_lm.py model.name=tiny data.name=stdlib optim.lr=3e-3   # offline, on a CPU

`model.name` is anything `AutoModelForCausalLM.from_pretrained` takes; `tiny` builds a small Llama
of `model.layers` x `model.width` from its config with the byte-level ByT5 tokenizer, so nothing is
downloaded. `data.name` is anything `load_dataset` takes, or `stdlib`: chats built from the Python
standard library's sources (the user gives a function's signature, the assistant answers with the
first line of its docstring), which needs no download either.

A row with `data.messages` (a list of {"role", "content"} turns) is rendered with the tokenizer's
chat template (a plain one where it has none), and the loss is on the last assistant answer only:
the prompt's labels are -100. A row with `data.text` is language modelling on all its tokens. The
loss is a mean over target tokens (`loss_per: tokens`). The base is frozen, so checkpoints hold the
adapter only; `launch.py export RUN OUT` writes the adapter and the tokenizer, `--merge` a plain
transformers model (docs/finetuning.md).

`data.pack=true` packs each batch's samples into as few rows of `data.max_len` tokens as fit, each
attending to itself alone (toolkit.data.pack): the same samples and targets in fewer, fuller rows.
"""

import ast
import functools
import sysconfig
from pathlib import Path

from toolkit import UserError
from toolkit.data import pack, padded

config = {
    "model": {
        "name": "Qwen/Qwen2.5-0.5B-Instruct",  # a hub id or folder for from_pretrained; tiny: a small Llama
        "layers": 2,                            # tiny: decoder layers
        "width": 64,                            # tiny: hidden size (heads of 32), 2x that in the MLP
    },
    "lora": {
        "r": 16,                # the adapter's rank
        "alpha": 32,            # its scale is alpha / r
        "dropout": 0.05,
        "target": "all-linear",  # the modules it adapts: all-linear (not the output layer) or a list of names
    },
    "data": {
        "name": "trl-lib/Capybara",  # load_dataset(name, config); json/csv/parquet with data.files; stdlib: offline
        "config": "",                # the dataset's configuration ("": none)
        "files": "",                 # for json/csv/parquet: a path with {split}, e.g. chats/{split}.jsonl
        "messages": "messages",      # the column of chat turns ...
        "text": "text",              # ... else the column of plain text
        "val_split": "test",         # the split to validate on; a dataset without it gives val_size of train
        "val_size": 200,
        "max_len": 512,              # tokens per sample, longer ones are cut
        "max_samples": 0,            # of train, at most (0: all)
        "pack": False,               # pack each batch's samples into rows of max_len tokens
    },
    "epochs": 1,
    "batch_size": 8,
    "eval_batch_size": 16,
    "loss_per": "tokens",
    "optim": {"lr": 2e-4},
    "sched": {"name": "cosine", "warmup_steps": 20},
    "log_every": 10,
    "checkpoint": {"monitor": "val/loss", "mode": "min"},
}

PLAIN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@functools.cache
def tokenizer(name):
    from transformers import AutoTokenizer, ByT5Tokenizer

    tok = ByT5Tokenizer() if name == "tiny" else AutoTokenizer.from_pretrained(name)
    if not tok.chat_template:
        tok.chat_template = PLAIN_TEMPLATE
    return tok


def datasets(cfg):
    data, tok = cfg.data, tokenizer(cfg.model.name)
    raw = stdlib_chats(data.val_size) if data.name == "stdlib" else load(data)
    columns = raw["train"].column_names
    column = data.messages if data.messages in columns else data.text if data.text in columns else None
    if column is None:
        raise UserError(f"data.messages={data.messages} and data.text={data.text}: the dataset has neither; its "
                        f"columns are {', '.join(columns)}")
    encode = functools.partial(encode_chat if column == data.messages else encode_text, tok=tok, cfg=cfg)
    splits = {}
    for split, table in (("train", raw["train"]), ("val", raw["val"])):
        if split == "train" and data.max_samples:
            table = table.select(range(min(data.max_samples, len(table))))
        table = table.map(lambda row: encode(row[column]), remove_columns=columns)
        splits[split] = table.filter(lambda row: any(label != -100 for label in row["labels"][1:]))
    return splits


def encode_text(text, tok, cfg):
    ids = tok(text, add_special_tokens=False).input_ids[:cfg.data.max_len - 1] + [tok.eos_token_id]
    return {"input_ids": ids, "labels": ids}


def encode_chat(messages, tok, cfg):
    """The turns rendered with the chat template; labels on the last answer (and its end) only."""
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    whole = tok.apply_chat_template(messages, tokenize=False)
    if messages[-1]["role"] != "assistant" or not whole.startswith(prompt):
        return {"input_ids": [tok.eos_token_id], "labels": [-100]}  # nothing to learn: filtered out
    asked = tok(prompt, add_special_tokens=False).input_ids
    answer = tok(whole[len(prompt):], add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = (asked + answer)[:cfg.data.max_len]
    return {"input_ids": ids, "labels": ([-100] * len(asked) + answer)[:cfg.data.max_len]}


def load(data):
    import datasets as hf

    files = {split: data.files.format(split=split) for split in ("train", data.val_split)} if data.files else None
    try:
        raw = hf.load_dataset(data.name, data.config or None, data_files=files)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise UserError(f"data.name={data.name} data.config={data.config}: {e}") from None
    if data.val_split in raw:
        return {"train": raw["train"], "val": raw[data.val_split]}
    parts = raw["train"].train_test_split(test_size=data.val_size, seed=0)
    return {"train": parts["train"], "val": parts["test"]}


def stdlib_chats(val_size):
    """Chats from the standard library's functions: a signature asked, its docstring's first line answered."""
    import datasets as hf

    chats = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            doc = isinstance(node, ast.FunctionDef) and ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                signature = f"def {node.name}({ast.unparse(node.args)}):"
                chats.append([{"role": "user", "content": f"What does {signature} do?"},
                              {"role": "assistant", "content": doc.strip().splitlines()[0]}])
        if len(chats) >= 4000:
            break
    table = hf.Dataset.from_dict({"messages": chats}).shuffle(seed=0)
    return {"train": table.select(range(val_size, len(table))), "val": table.select(range(val_size))}


def collate(batch, cfg):
    pad_id = tokenizer(cfg.model.name).pad_token_id or 0
    rows = pack(batch, cfg.data.max_len, pad_id) if cfg.data.pack else padded(batch, pad_id)
    return {**rows, "samples": len(batch)}


def model(cfg):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.model.name == "tiny":
        m = cfg.model
        base = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer("tiny")), hidden_size=m.width, intermediate_size=2 * m.width,
            num_hidden_layers=m.layers, num_attention_heads=max(1, m.width // 32),
            max_position_embeddings=cfg.data.max_len))
    else:
        base = AutoModelForCausalLM.from_pretrained(cfg.model.name)
    target = cfg.lora.target if isinstance(cfg.lora.target, str) else list(cfg.lora.target)
    return get_peft_model(base, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                           target_modules=target, task_type="CAUSAL_LM"))


def loss(model, batch, cfg):
    inputs = {key: value for key, value in batch.items() if key != "samples"}
    out = model(**inputs, use_cache=False)  # no KV cache: packed rows attend within each sample
    return out.loss, {"samples": batch["samples"], "tokens": (batch["labels"][:, 1:] != -100).sum()}


def export(cfg, folder):  # launch.py export: the tokenizer beside the adapter or the merged model
    tokenizer(cfg.model.name).save_pretrained(folder)
