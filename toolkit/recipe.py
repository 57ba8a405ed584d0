"""Load a recipe file by path and check its contract.

A recipe is one Python file with:

    config = {...}                    # its default config (optional; adds keys such as data.root)
    def datasets(cfg): ...            # -> {"train": ds, "val": ds, "test": ds}; val and test optional
    def model(cfg): ...               # -> torch.nn.Module
    def loss(model, batch, cfg): ...  # -> (scalar loss, {"samples": n, other summable counts...})

and optionally `metrics(totals) -> dict` to turn summed counts into reported numbers, and the other
hooks of OPTIONAL (a `|` separates the signatures a hook may have).
"""

import functools
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path

from toolkit import UserError

REQUIRED = {"datasets": "cfg", "model": "cfg", "loss": "model, batch, cfg"}
OPTIONAL = {"metrics": "totals", "optimizer": "cfg, model", "collate": "batch | batch, cfg", "flops": "cfg, model",
            "export": "cfg, folder"}


def load(path):
    """Import the recipe at `path` and return the module; raise `UserError` if it breaks the contract."""
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

    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise UserError(f"recipe {path} must define {', '.join(f'{f}()' for f in missing)}; "
                        f"see recipes/lenet.py for the contract")
    for name, params in {**REQUIRED, **OPTIONAL}.items():
        function = getattr(module, name, None)
        if function is None:
            continue
        options = params.split(" | ")
        if not any(_takes(function, *option.split(", ")) for option in options):
            raise UserError(f"recipe {path}: {name} must be a function "
                            f"{' or '.join(f'{name}({option})' for option in options)}")
    config = getattr(module, "config", {})
    if not isinstance(config, dict):
        raise UserError(f"recipe {path}: `config` must be a dict, got {type(config).__name__}")
    module.config = config
    module.name = path.stem
    module.path = path
    return module


def _takes(function, *args):
    """Whether `function` (any callable) can be called with these positional arguments."""
    try:
        inspect.signature(function).bind(*args)
    except (TypeError, ValueError):
        return False
    return True


def collate(recipe, cfg):
    """The recipe's `collate` as a function of the batch alone (`collate(batch, cfg)` gets the run's
    cfg, e.g. to build a tokenizer's collator), or None."""
    function = getattr(recipe, "collate", None)
    if function is None or _takes(function, "batch"):
        return function
    return functools.partial(function, cfg=cfg)


class RecipeError(UserError):
    """A recipe file that fails to import (a syntax error, a missing module, ...): its traceback
    as Python prints it, from the recipe's own frames on, without the import machinery's."""

    def __init__(self, path, error):
        frames = traceback.extract_tb(error.__traceback__)
        own = [i for i, frame in enumerate(frames) if Path(frame.filename).resolve() == Path(path).resolve()]
        shown = traceback.TracebackException.from_exception(error)
        shown.stack = traceback.StackSummary.from_list(frames[own[0]:] if own else [])
        super().__init__("".join(shown.format()).rstrip())
