"""What a config key is: its facts, written once, where the key is declared (`toolkit/config/keys.py`).
The checks, the resume rules, the defaults and the table of keys are all read from these."""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Key:
    """One key: its default (which also gives its type), its meaning, and what values it takes. A
    default of {} takes any keys under it (optim.lr_mult's module prefixes)."""
    default: Any
    meaning: str = ""
    # The allowed values (for a list: of its elements). A function gives them when the config is
    # checked: a registry's names (the optimizers of toolkit.optim), whose module imports torch.
    choices: Iterable | Callable[[], Iterable] = ()
    minimum: float = 0  # for a number: the smallest valid value
    resumable: bool = False  # a resume may change it: it changes neither the model, the data nor the results so far
    check: Callable[[Any], str | None] | None = None  # a rule of its own: the problem with a value, or None

    def allowed(self):
        return tuple(self.choices() if callable(self.choices) else self.choices)


@dataclasses.dataclass(frozen=True)
class Group:
    """Keys under one name (`optim.lr`); `meaning` is shown for those that have none of their own."""
    keys: dict
    meaning: str = ""
    resumable: bool = False  # every key under it may change on resume (a tracker's, notify's)


def defaults(tree):
    """The plain nested dict of defaults of a tree of `Key`s and `Group`s."""
    return {name: defaults(node.keys) if isinstance(node, Group) else node.default for name, node in tree.items()}


def leaves(tree, prefix="", group=None):
    """(dotted name, Key, its enclosing Group or None) for every key of the tree, in order."""
    for name, node in tree.items():
        if isinstance(node, Group):
            yield from leaves(node.keys, f"{prefix}{name}.", node)
        else:
            yield f"{prefix}{name}", node, group
