"""`launch.py export RUN OUT`: a run's weights as a folder that code without the toolkit loads.

A model with `save_pretrained` (transformers, diffusers, peft) is written with it, so that its
`from_pretrained(OUT)` loads it (for transformers: config.json, model.safetensors, tied weights once;
for peft: the adapter, which `PeftModel.from_pretrained(base, OUT)` loads; with `merge`, the
adapter merged into its base by `merge_and_unload`, a transformers folder for code without peft);
any other model as OUT/model.safetensors beside the run's config.yaml, which `recipe.model(cfg)`
and `load_state_dict` read back. A recipe's optional `export(cfg, folder)` hook adds the rest
(a tokenizer's files, say) before the folder appears.
"""

import json
import re
import shutil
from pathlib import Path

from accelerate.utils import set_seed

from toolkit import UserError
from toolkit.run import rundir
from toolkit.state import checkpoint
from toolkit.state.weights import load_weights, write_safetensors


def export(recipe, cfg, run_dir, out, which="", use_ema=False, merge=False):
    """Write checkpoint `which` of the run (default: best, else latest), or its EMA weights, into
    the new folder `out`, whole or not at all; a peft model's adapter merged into its base if
    `merge`. Returns the checkpoint's path and what was written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: export into a new one")
    which = which or ("best" if checkpoint.read_state(checkpoint.find(run_dir)).best_checkpoint else "latest")
    path = checkpoint.find(run_dir, which)
    set_seed(cfg.seed)  # as a run builds it: frozen weights that a checkpoint left out are drawn again alike
    model = recipe.model(cfg)
    load_weights(model, checkpoint.weights_of(path, use_ema), strict=True, base=cfg.init_from)
    if merge:
        if not callable(getattr(model, "merge_and_unload", None)):
            raise UserError(f"--merge merges a peft adapter into its base model; the recipe's model is a "
                            f"{type(model).__name__}, with no adapter: export it without --merge")
        model = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    with rundir.replacing(out) as folder:
        folder.mkdir()
        if callable(getattr(model, "save_pretrained", None)):
            model.save_pretrained(folder)
            written = f"{type(model).__name__}.save_pretrained (its from_pretrained(OUT) loads it)" + \
                (", the adapter merged into it" if merge else "") + portable_base(folder / "adapter_config.json")
        else:
            write_safetensors(model.state_dict(), folder / "model.safetensors")
            shutil.copy2(Path(run_dir) / "config.yaml", folder / "config.yaml")
            written = "model.safetensors and config.yaml (the recipe's model(cfg) and load_state_dict read them)"
        recipe.export(cfg, folder)
    return path, written


def portable_base(adapter_config):
    """A peft adapter's config names its base as the recipe loaded it (`base_model_name_or_path`):
    a hub id stays; a snapshot in the HF cache (.../models--org--name/snapshots/<sha>) becomes
    its hub id, org/name, which loads anywhere. Returns what the export line adds: a warning
    for a base named by another local path, which only this machine has."""
    if not adapter_config.is_file():
        return ""
    values = json.loads(adapter_config.read_text(encoding="utf-8"))
    base = values.get("base_model_name_or_path") or ""
    cached = re.search(r"models--(.+?)/snapshots/", base.replace("\\", "/"))
    if cached:
        values["base_model_name_or_path"] = cached.group(1).replace("--", "/")
        adapter_config.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
        return f"; its base: {values['base_model_name_or_path']} (the hub id of the cached snapshot it was loaded from)"
    if base and Path(base).expanduser().exists():
        return (f"; its adapter_config.json names the base by a local path ({base}): elsewhere, load the base "
                f"yourself and give it to PeftModel.from_pretrained(base, OUT)")
    return ""
