"""Sharded checkpoints. Accelerate's save_state writes FSDP's sharded state dicts with torch's
distributed checkpoint (pytorch_model_fsdp_0/, optimizer_0/: .distcp files and a .metadata),
and DeepSpeed's engine its own files (pytorch_model/*.pt). Their loaders unpickle some of them
with code execution (DCP's .metadata with pickle.load, DeepSpeed's files with
torch.load(weights_only=False)): `check_pickles` reads each of those first, with an unpickler
that builds only the plain types those files hold, and refuses a file that asks for more."""

import pickle
from pathlib import Path

import torch

from toolkit import UserError
from toolkit.distributed.processes import first_line
from toolkit.distributed.strategy import describe, kind

# The model's files: FSDP's sharded state dict (DCP), its full one (torch.save, read with
# weights_only=True), DeepSpeed's folder.
FSDP_MODEL, FSDP_FULL_MODEL, DEEPSPEED_MODEL = "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin", "pytorch_model"
SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed's conversion scripts: code, left out of checkpoints


def check_pickles(folder):
    """Read every file of the checkpoint `folder` that a strategy's loader will unpickle, with an
    unpickler that only builds what such a file holds; UserError naming the first that holds more."""
    folder = Path(folder)
    for path in sorted(folder.glob("*/.metadata")):
        try:
            with open(path, "rb") as f:
                _MetadataUnpickler(f).load()
        except Exception as e:  # noqa: BLE001 - any failure: the file is not what DCP writes
            raise UserError(f"{path} is not a plain checkpoint index ({type(e).__name__}: {e}); refusing to load "
                            f"it, as its loader would run what it holds") from None
    pickles = sorted(folder.glob(f"{DEEPSPEED_MODEL}/*.pt"))
    if pickles:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        for path in pickles:
            try:
                with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
                    torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                line = next((x.strip() for x in str(e).splitlines() if "GLOBAL" in x), first_line(e))
                raise UserError(f"{path} holds more than tensors and plain values ({line}); refusing to load it, as "
                                f"DeepSpeed would unpickle it with code execution") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds the index of a distributed checkpoint: DCP's metadata classes, torch.Size, dtypes,
    layouts and paths; any other global is refused (pickle's documented way to restrict it)."""

    ALLOWED = {"torch.distributed.checkpoint.metadata": None,
               "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
               "torch.serialization": {"_get_layout"}, "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath"},
               "torch": {"Size"}, "collections": {"OrderedDict"}}

    def find_class(self, module, name):
        names = self.ALLOWED.get(module, set())
        found = super().find_class(module, name) if module in self.ALLOWED and "." not in name else None
        if names is None:  # the module's own classes
            if isinstance(found, type) and found.__module__ == module:
                return found
        elif name in names or (module == "torch" and isinstance(found, torch.dtype)):
            return found
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def written_by(folder):
    """The strategy whose files hold the model in the checkpoint `folder`: "FSDP", "DeepSpeed", or
    None (model.safetensors: one process or DDP)."""
    folder = Path(folder)
    if (folder / FSDP_MODEL).is_dir() or (folder / FSDP_FULL_MODEL).is_file():
        return "FSDP"
    return "DeepSpeed" if (folder / DEEPSPEED_MODEL).is_dir() else None


def refuse_a_foreign_checkpoint(accelerator, folder, num_processes):
    """A checkpoint that this launch's strategy cannot load: another strategy's files, or
    DeepSpeed's for another number of processes (its files are per rank; FSDP's distributed
    checkpoint reshards to any number)."""
    strategy, mine = written_by(folder), kind(accelerator)
    if strategy != {"FSDP2": "FSDP", "FSDP": "FSDP", "DeepSpeed": "DeepSpeed"}.get(mine):
        raise UserError(f"{folder} was written {f'by {strategy}' if strategy else 'without sharding'}, and this "
                        f"launch trains {describe(accelerator)}: resume it with the launch config that trained it")
    if strategy == "DeepSpeed" and num_processes != accelerator.num_processes:
        raise UserError(f"{folder} holds DeepSpeed's files of {num_processes} processes, which load into as many "
                        f"only: resume it with --num_processes {num_processes}")


def full_weights(folder, model):
    """The whole weights of the model in a sharded checkpoint `folder`, read in this one process
    (the names of `model`, the recipe's module), or None if the folder holds no sharded model."""
    folder = Path(folder)
    if (folder / FSDP_FULL_MODEL).is_file():
        return torch.load(folder / FSDP_FULL_MODEL, map_location="cpu", weights_only=True)
    if (folder / FSDP_MODEL).is_dir():
        import torch.distributed.checkpoint as dcp

        weights = {"model": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}}
        dcp.load(weights, checkpoint_id=folder / FSDP_MODEL, no_dist=True)
        return weights["model"]
    if (folder / DEEPSPEED_MODEL).is_dir():
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise UserError(f"{folder} was written by DeepSpeed, whose files need it installed: "
                            f"pip install -e '.[deepspeed]'") from None
        return get_fp32_state_dict_from_zero_checkpoint(folder, tag=DEEPSPEED_MODEL)
    return None
