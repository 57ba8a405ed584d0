"""Load a recipe file by path and check its contract.

A recipe is one Python file with:

    config = {...}                    # its default config (optional; adds keys such as data.root)
    def datasets(cfg): ...            # -> {"train": ds, "val": ds, "test": ds}; val and test optional
    def model(cfg): ...               # -> torch.nn.Module
    def loss(model, batch, cfg): ...  # -> (scalar loss, {"samples": n, other summable counts...})

and optionally `metrics(totals) -> dict` to turn summed counts into reported numbers, and the other
hooks of OPTIONAL (a `|` separates the signatures a hook may have). `load` returns a `Recipe`, in
which every optional hook has its default: the toolkit calls hooks, it never asks whether they exist.
"""

import dataclasses
import functools
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from toolkit import UserError
from toolkit.metrics import per_sample

REQUIRED = {"datasets": "cfg", "model": "cfg", "loss": "model, batch, cfg"}
OPTIONAL = {"metrics": "totals", "optimizer": "cfg, model", "collate": "batch | batch, cfg", "flops": "cfg, model",
            "export": "cfg, folder"}


def _no_flops(cfg, model):
    return 0


def _no_export(cfg, folder):
    pass


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A loaded recipe file: its name (the file's stem), path, default config and hooks."""

    name: str
    path: Path
    config: dict
    module: ModuleType
    datasets: Callable  # (cfg) -> {"train": ds, "val": ds, "test": ds}
    model: Callable  # (cfg) -> torch.nn.Module
    loss: Callable  # (model, batch, cfg) -> (scalar loss, {"samples": n, ...})
    metrics: Callable = per_sample  # (summed counts) -> reported numbers; default: each count per sample
    optimizer: Callable | None = None  # (cfg, model) -> a torch optimizer; None: the config's optim.*
    collate: Callable | None = None  # (batch) or (batch, cfg) -> a batch; None: the DataLoader's default
    flops: Callable = _no_flops  # (cfg, model) -> FLOPs per unit of loss_per (for the MFU); default 0: unknown
    export: Callable = _no_export  # (cfg, folder): add files to `launch.py export`'s folder

    def collate_for(self, cfg):
        """`collate` as a function of the batch alone (`collate(batch, cfg)` gets the run's cfg, e.g.
        to build a tokenizer's collator), or None."""
        if self.collate is None or _takes(self.collate, "batch"):
            return self.collate
        return functools.partial(self.collate, cfg=cfg)


def load(path):
    """Import the recipe at `path` and return its `Recipe`; raise `UserError` if it breaks the contract."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    if path.suffix != ".py":
        raise UserError(f"a recipe is a Python file (.py), got {path}")
    name = f"recipe_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # lets pickle and dataclasses inside the recipe find it
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - shown as Python shows it, from the recipe's file on
        raise RecipeError(path, e) from e

    signatures = {**REQUIRED, **OPTIONAL}
    hooks = {name: getattr(module, name) for name in signatures if getattr(module, name, None) is not None}
    missing = [f for f in REQUIRED if not callable(hooks.get(f))]
    if missing:
        raise UserError(f"recipe {path} must define {', '.join(f'{f}()' for f in missing)}; "
                        f"see recipes/lenet.py for the contract")
    for name, function in hooks.items():
        options = signatures[name].split(" | ")
        if not any(_takes(function, *option.split(", ")) for option in options):
            raise UserError(f"recipe {path}: {name} must be a function "
                            f"{' or '.join(f'{name}({option})' for option in options)}")
    config = getattr(module, "config", {})
    if not isinstance(config, dict):
        raise UserError(f"recipe {path}: `config` must be a dict, got {type(config).__name__}")
    return Recipe(name=path.stem, path=path, config=config, module=module, **hooks)


def _takes(function, *args):
    """Whether `function` (any callable) can be called with these positional arguments."""
    try:
        inspect.signature(function).bind(*args)
    except (TypeError, ValueError):
        return False
    return True


class RecipeError(UserError):
    """A recipe file that fails to import (a syntax error, a missing module, ...): its traceback
    as Python prints it, from the recipe's own frames on, without the import machinery's."""

    def __init__(self, path, error):
        frames = traceback.extract_tb(error.__traceback__)
        own = [i for i, frame in enumerate(frames) if Path(frame.filename).resolve() == Path(path).resolve()]
        shown = traceback.TracebackException.from_exception(error)
        shown.stack = traceback.StackSummary.from_list(frames[own[0]:] if own else [])
        super().__init__("".join(shown.format()).rstrip())
