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
    hooks["loss"] = CheckedLoss(hooks["loss"], path)
    return Recipe(name=path.stem, path=path, config=config, module=module, **hooks)


class CheckedLoss:
    """The recipe's `loss`, whose first result is held to the contract: (a loss tensor of one
    element, {"samples": n, other counts: numbers or one-element tensors}). A recipe that breaks it
    ends in one line that names its loss and what it returned, not in a traceback from deep in the
    toolkit (backward, an all-reduce). Later calls cost one attribute test."""

    def __init__(self, function, path):
        self.function, self.path, self.checked = function, path, False
        functools.update_wrapper(self, function)

    def __call__(self, model, batch, cfg):
        result = self.function(model, batch, cfg)
        if not self.checked:
            problem = loss_problem(result)
            if problem:
                raise UserError(f"the recipe's loss() ({self.path}) {problem}")
            self.checked = True
        return result


def loss_problem(result):
    """What is wrong with a result of a recipe's loss(), as the end of a sentence, or None."""
    import torch

    example = "e.g. (F.cross_entropy(logits, y), {'samples': len(y), 'correct': (logits.argmax(1) == y).sum()})"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        return f"must return (loss, counts), {example}; it returned {_describe(result)}"
    loss, counts = result
    if not torch.is_tensor(loss) or loss.numel() != 1:
        return (f"must return a loss of one element, the batch's mean (the toolkit backpropagates it); it returned "
                f"{_describe(loss)}")
    if not isinstance(counts, dict) or "samples" not in counts:
        return (f"must return counts with a 'samples' entry (the number of samples in the batch), {example}; "
                f"it returned {_describe(counts)}")
    for name, count in counts.items():
        number = isinstance(count, (int, float)) or (torch.is_tensor(count) and count.numel() == 1
                                                     and not count.dtype.is_complex)
        if not number:
            return (f"returned the count {name!r} as {_describe(count)}: a count is a number or a tensor of one "
                    f"element, which the toolkit sums over batches and processes (a per-sample tensor: sum it)")
    return None  # (the loss_per count is checked where it is used: metrics.check_counts)


def _describe(value):
    import torch

    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


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
