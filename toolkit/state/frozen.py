"""Checkpoints of what trains. A model with frozen parameters (a LoRA adapter on its base, a
frozen backbone, a teacher held inside the recipe's module) is saved without them: they are what
`recipe.model(cfg)` (with `init_from`) builds, so every checkpoint holds the trainable tensors, the
buffers and the optimizer's state, and frozen.json names the frozen tensors with a digest of their
values. Whatever loads the checkpoint (a resume, `test`, `export`, `init_from`) rebuilds them and
checks the digest: weights that differ from the run's are refused in one line, never trained or
evaluated in silence.

A strategy that writes its own checkpoint files (sharded ones) saves every process's part of every
tensor, frozen ones too: this applies where the model is saved as one file.
"""

import hashlib
import json
from pathlib import Path

import torch

from toolkit import UserError, distributed

FILE = "frozen.json"


def frozen_names(model):
    """The state-dict names of `model`'s parameters that do not train (both names of a tied one),
    or [] when all train or none does (there is nothing to leave out, or nothing else to keep)."""
    named = list(model.named_parameters(remove_duplicate=False))
    frozen = [name for name, p in named if not p.requires_grad]
    return frozen if 0 < len(frozen) < len(named) else []


def digest(model, names):
    """sha256 of the named tensors of `model`'s state dict: their names, dtypes, shapes and bytes."""
    tensors = model.state_dict()
    hasher = hashlib.sha256()
    for name in sorted(names):
        tensor = tensors[name].detach().cpu().contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


class LeaveOutFrozen:
    """Saves of `model` (prepared on `accelerator`) that leave its frozen tensors out, from the
    moment it is built: it records their digest once (they do not change while the run trains),
    and each `accelerator.save_state` drops them from the model's weights and writes frozen.json
    beside them. `on`: whether the model has frozen tensors to leave out."""

    def __init__(self, accelerator, model):
        net = distributed.recipe_model(accelerator, model)
        self.names = frozen_names(net) if distributed.saves_one_file(accelerator) else []
        self.on = bool(self.names)
        if not self.on:
            return
        self.record = {"names": self.names, "sha256": digest(net, self.names)}
        self.main = accelerator.is_main_process
        accelerator.register_save_state_pre_hook(self._leave_out)

    def _leave_out(self, models, weights, output_dir):
        names = set(self.names)
        for state_dict in weights[:1]:  # the model's, under the names of its wrappers (DDP's module., ...)
            for name in [name for name in state_dict if _unwrapped(name) in names]:
                del state_dict[name]
        if self.main:
            (Path(output_dir) / FILE).write_text(json.dumps(self.record) + "\n", encoding="utf-8")

    def without(self, state_dict):
        """`state_dict` of the recipe's model without the frozen tensors (for ema.safetensors)."""
        names = set(self.names)
        return {name: tensor for name, tensor in state_dict.items() if name not in names}


def _unwrapped(name):
    """A state-dict name without the prefixes of the wrappers around the recipe's model."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.partition(".")[2]
    return name


def record_of(folder):
    """The frozen.json record of a checkpoint folder (or of the folder of a weights file in it), or None."""
    folder = Path(folder)
    path = (folder if folder.is_dir() else folder.parent) / FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {"names": list(record["names"]), "sha256": str(record["sha256"])}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged") from None


def check(model, record, source):
    """Refuse `model` (its frozen tensors rebuilt) if they are not the ones the run trained with."""
    if digest(model, record["names"]) != record["sha256"]:
        raise UserError(f"{source} holds the trainable weights only, and the {len(record['names'])} frozen tensors "
                        f"that the recipe's model(cfg) (with init_from) builds now differ from the run's (sha256 "
                        f"{record['sha256'][:12]}...): the base model or its weights changed since the run")
