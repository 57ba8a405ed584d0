"""Weights in and out: safetensors files that load without running code, state dicts read with
weights_only=True, an HF model's `from_pretrained`, and tied or shared tensors (written once, loaded
back into every name that shares them)."""

from pathlib import Path

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from toolkit import UserError, distributed
from toolkit.run import rundir
from toolkit.state import frozen


def load_weights(model, source, strict=False, base=""):
    """Load weights into `model` from a .safetensors file, a .pt/.pth/.bin state dict (read with
    weights_only=True), a folder with a `model.safetensors` (a run's best weights, a checkpoint, an
    export), or, for a `transformers` model, anything its `from_pretrained` takes (a hub id, an HF
    folder). Non-strict unless `strict`; returns (missing, unexpected) key lists.

    A checkpoint saved without the model's frozen tensors (`toolkit.state.frozen`) takes them from
    `model` as built, after `base` (the run's init_from) is loaded into it, and checks them."""
    path = Path(source)
    left_out = frozen.record_of(path) if path.exists() else None
    if left_out:
        if base and Path(base) != path:
            load_weights(model, base)
        loaded = load_weights_file(model, source, path, strict, optional=left_out["names"])
        frozen.check(model, left_out, source)
        return loaded
    return load_weights_file(model, source, path, strict)


def load_weights_file(model, source, path, strict, optional=()):
    """`load_weights` of `path` (`source` as the user gave it); the names in `optional` may be missing."""
    if path.is_dir() and not (path / "model.safetensors").is_file() and distributed.written_by(path):
        distributed.check_pickles(path)  # a sharded checkpoint: its whole weights, read in this process
        return fit(model, distributed.full_weights(path, model), source, strict, optional)
    if path.is_dir() and (path / "adapter_config.json").is_file() and _is_peft(model):
        return _adapter(model, path, strict)  # a peft adapter (an export), into the recipe's peft model
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists() and _is_peft(model):
        return _adapter(model, source, strict)  # a peft adapter's hub id
    if not path.is_file() and callable(getattr(model, "from_pretrained", None)):
        weights = _pretrained(model, source)  # an HF hub id, a sharded HF folder
    elif not path.is_file():
        raise UserError(f"{source}: no such file (give a .safetensors file, a run folder or a checkpoint)")
    elif path.suffix == ".safetensors":
        weights = load_safetensors(path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - e.g. a pickle that would run code
            raise UserError(f"{source} cannot be loaded safely ({reason(e)})") from e
        if isinstance(weights, dict) and isinstance(weights.get("state_dict", weights.get("model")), dict):
            weights = weights.get("state_dict", weights.get("model"))
    else:
        raise UserError(f"{source}: expected a .safetensors, .pt, .pth or .bin file or a folder")
    if _is_peft(model) and weights and not any(name.startswith("base_model.") for name in weights):
        return fit(model.get_base_model(), _into_base_layers(model.get_base_model(), weights), source, strict,
                   optional=[name for name, _ in model.get_base_model().named_parameters() if "lora_" in name])
    return fit(model, weights, source, strict, optional)


def _is_peft(model):
    return type(model).__module__.startswith("peft.") and callable(getattr(model, "get_base_model", None))


def _adapter(model, folder, strict):
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors) loaded into the peft
    `model`, as PeftModel.from_pretrained would; returns the adapter's (missing, unexpected) names."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
    missing = [name for name in result.missing_keys if "lora_" in name]
    if strict and (missing or result.unexpected_keys):
        raise UserError(f"{folder} does not fit the model's adapter: missing {missing or 'none'}, unexpected "
                        f"{result.unexpected_keys or 'none'}")
    return missing, result.unexpected_keys


def _into_base_layers(base, weights):
    """A plain model's state dict (a merged export, the base's own weights) named as the peft
    model's base, whose adapted layers hold their weights in `<layer>.base_layer`."""
    adapted = {name.replace(".base_layer", ""): name for name in base.state_dict() if ".base_layer." in name}
    return {adapted.get(name, name): tensor for name, tensor in weights.items()}


def fit(model, weights, source, strict=False, optional=()):
    """Load the state dict `weights` (read from `source`, for the error) into `model`; UserError
    if it does not fit. Returns (missing, unexpected) key lists."""
    consume_prefix_in_state_dict_if_present(weights, "module.")  # saved from a DDP-wrapped model
    try:
        return load_into(model, weights, strict, optional)
    except RuntimeError as e:
        raise UserError(f"{source} does not fit the model: {str(e).splitlines()[1].strip()}") from e


def _pretrained(model, source):
    """The state dict of `type(model).from_pretrained(source)` (load_state_dict casts it to the model's dtypes)."""
    try:
        return type(model).from_pretrained(str(source)).state_dict()
    except Exception as e:  # noqa: BLE001 - not found, offline, another architecture: one line
        raise UserError(f"init_from={source}: {type(model).__name__}.from_pretrained failed: {reason(e)}") from e


def load_into(model, weights, strict=True, optional=()):
    """`model.load_state_dict(weights)`, where a name that `weights` lacks because it shares its
    tensor with a name that it has (tied embeddings: safetensors holds one of them) is not missing:
    loading the one loads both; nor are the names in `optional`. Returns (missing, unexpected) key lists."""
    result = model.load_state_dict(weights, strict=False)
    optional = set(optional)
    missing = [name for name in result.missing_keys if name not in optional]
    if missing:
        tensors, names = model.state_dict(keep_vars=True), {}
        for name, tensor in tensors.items():
            names.setdefault(_place(tensor), set()).add(name)
        missing = [name for name in missing if not names[_place(tensors[name])] & weights.keys()]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}:\n"
                           f"missing keys {missing or 'none'}, unexpected keys {result.unexpected_keys or 'none'}")
    return missing, result.unexpected_keys


def load_safetensors(path, device="cpu"):
    """A safetensors file's tensors on `device` (a torch.device or its name); UserError if damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = torch.device(device)
    try:  # safetensors takes "cpu" but not "cpu:0", Accelerate's device for CPU processes
        return load_file(path, device="cpu" if device.type == "cpu" else str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} cannot be read as safetensors ({e}); the file is damaged") from None


def reason(error):
    """The informative line of an exception: for a refused pickle, the global it wanted."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    refused = [line for line in lines if "GLOBAL" in line or "WeightsUnpickler" in line]
    return f"{type(error).__name__}: {(refused or lines or [''])[0]}"


def export(weights, target):
    with rundir.replacing(target) as tmp:
        write_safetensors(weights, tmp)


def write_safetensors(weights, path):
    from safetensors.torch import save_file

    save_file(_unshared(weights), path, metadata={"format": "pt"})
    rundir.readable(path)
    rundir.fsync(path)


def _place(tensor):
    """Where a tensor's values are: two names of one place are one tensor (tied weights)."""
    if not tensor.numel():
        return id(tensor)
    return tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride()


def _unshared(weights):
    """`weights` (a state dict) as safetensors can write them, on the CPU: a tensor that an earlier
    name holds already (tied embeddings, a shared parameter) is written once, under that name
    (`load_into` gives it back to both); another view of a storage already written is a copy."""
    kept, places, storages = {}, set(), set()
    for name, tensor in weights.items():
        tensor = tensor.detach()
        place = _place(tensor)
        if place in places:
            continue
        places.add(place)
        storage = place[:2] if tensor.numel() else place
        kept[name] = tensor.cpu().clone() if storage in storages else tensor.cpu().contiguous()
        storages.add(storage)
    return kept
