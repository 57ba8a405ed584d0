"""Layered, strict configuration.

Layers, later wins:

    DEFAULTS (keys.py)  <  the recipe's `config`  <  each `--config file.yaml`  <  `key.sub=value`

The first two layers define every valid key and its type; the recipe may add keys of its own
(e.g. `data.root`). The later layers may only set keys that exist, with values of the key's type.
All problems are collected and raised together as one `ConfigError`, one line per problem.

Files and values are read as YAML 1.2 (`toolkit.config.files`).
"""

import difflib
import re
from collections.abc import Mapping

from toolkit.config import spec
from toolkit.config.errors import ConfigError
from toolkit.config.files import short, show, yaml_load
from toolkit.config.keys import DEFAULTS, KEYS


class Config(Mapping):
    """The resolved, read-only config: `cfg.optim.lr` or `cfg["optim"]["lr"]`."""

    def __init__(self, values):
        values = {k: Config(v) if isinstance(v, Mapping) else tuple(v) if isinstance(v, list) else v
                  for k, v in values.items()}
        object.__setattr__(self, "_values", values)

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r} (keys here: {', '.join(self._values)})") from None

    def __setattr__(self, key, value):
        raise AttributeError("the config is read-only once resolved; set values with key=value overrides")

    def __repr__(self):
        return f"Config({self.to_dict()!r})"

    def replace(self, **values):
        """A copy with these top-level keys set to `values` (already typed and checked), e.g. the
        batch sizes that auto_batch_size settled on."""
        return Config({**self._values, **values})

    def to_dict(self):
        """Plain nested dicts and lists, e.g. for YAML or trackers."""
        return {k: v.to_dict() if isinstance(v, Config) else list(v) if isinstance(v, tuple) else v
                for k, v in self._values.items()}

    def flat(self):
        """{"optim.lr": 0.001, ...}: the form trackers want for hyperparameters."""
        return dict(_leaves(self))


# ---------------------------------------------------------------------------------------------
# Building it.

def parse_override(text):
    """`optim.lr=3e-3` -> ("optim.lr", "3e-3"); the value is typed later, against the key."""
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise ConfigError([f"malformed override {text!r}: expected key=value, e.g. optim.lr=3e-3"])
    return key, value


def resolve(recipe_config, files=(), overrides=()):
    """Merge the layers and return a `Config`; raise `ConfigError` listing every problem.

    `files` are YAML paths, or (source, mapping) pairs for layers read already."""
    problems = []
    schema = _merge(DEFAULTS, recipe_config, "the recipe's config", problems, schema=None)
    values = schema
    for path in files:
        if isinstance(path, tuple):  # (source, mapping): a file read already, e.g. a sweep's without its block
            path, layer = path
        else:
            layer = _read_layer(path, problems)
        if layer:
            values = _merge(values, layer, path, problems, schema)
    for text in overrides:
        try:
            key, raw = parse_override(text)
            layer = nest(key, _parse_value(key, raw, schema))
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        values = _merge(values, layer, "the command line", problems, schema)
    if _get(values, "debug.fast_run") is True and isinstance(values["grad_accum"], int):
        values = _merge(values, _fast_run(values["grad_accum"]), "debug.fast_run", problems, schema)
    problems += _check_values(values)
    if problems:
        raise ConfigError(problems)
    return Config(values)


def _fast_run(grad_accum):
    """What debug.fast_run=true means: one optimizer step, one val and one test batch. A length
    for the LR schedule that a stream without one needs (max_steps)."""
    return {"epochs": 1, "max_steps": 1, "max_minutes": 0.0,
            "limit_batches": {"train": grad_accum, "val": 1, "test": 1}}


def diff(cfg, base):
    """`key=value` strings for the leaves of `cfg` that differ from `base` (e.g. the recipe)."""
    return [f"{key}={short(new)}" for key, _, new in changes(cfg, base)]


def changes(cfg, base):
    """(key, old, new) for the leaves of `cfg` that differ from `base`."""
    flat_base = dict(_leaves(base))
    return [(k, flat_base.get(k), v) for k, v in _leaves(cfg) if flat_base.get(k, object()) != v]


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", list(v) if isinstance(v, tuple) else v


def _read_layer(path, problems):
    try:
        with open(path, encoding="utf-8") as f:
            layer = yaml_load(f, path)
    except OSError as e:
        problems.append(f"cannot read config file {path}: {e.strerror}")
        return None
    except ConfigError as e:
        problems.extend(e.problems)
        return None
    if layer is not None and not isinstance(layer, dict):
        problems.append(f"{path}: expected a mapping of keys at the top level, got {show(layer)}")
        return None
    return layer


def _merge(values, layer, source, problems, schema, prefix="", root=None):
    """A new dict: `values` updated from `layer`; problems are appended to `problems`.

    Keys and types come from `schema`. With `schema=None` (the recipe's own layer) new keys are
    welcome and the types come from the values they replace."""
    merged = dict(values)
    root = values if root is None else root
    for key, new in layer.items():
        name = f"{prefix}{key}"
        if schema is not None and key not in schema and schema != {}:  # a {} default takes any keys
            problems.append(f"unknown key {name!r} from {source}{_suggest(name, root)}")
            continue
        if key not in merged or (schema is not None and key not in schema):
            merged[key] = new
            continue
        default = merged[key] if schema is None else schema[key]
        if isinstance(default, dict):
            if isinstance(new, dict):
                sub_schema = None if schema is None else default
                merged[key] = _merge(merged[key], new, source, problems, sub_schema, f"{name}.", root)
            else:
                problems.append(f"{name}: expected a mapping with keys {', '.join(default)}, "
                                f"got {show(new)}, from {source}")
            continue
        try:
            merged[key] = _typed(new, default)
        except TypeError as e:
            problems.append(f"{name}: expected {e}, got {show(new)}, from {source}")
    return merged


def _typed(value, default):
    """`value` converted to the type of `default`, or TypeError naming the expected type."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise TypeError("true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("an integer")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError("a number")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise TypeError("text")
    if isinstance(default, (list, tuple)):
        if isinstance(value, list):
            return value
        raise TypeError("a list, e.g. [a, b]")
    return value


def _parse_value(key, raw, schema):
    """Type a command-line value: YAML rules, except that a text key takes the text as written
    (so `name=2024` stays "2024")."""
    if isinstance(_get(schema, key), str):
        return raw
    try:
        return yaml_load(raw, f"value of {key}")
    except ConfigError:
        raise ConfigError([f"malformed override {key}={raw}: the value is not valid YAML"]) from None


def nest(key, value):
    """`optim.lr`, 3 -> {"optim": {"lr": 3}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _check_values(values):
    """The problems with the values of every key of KEYS: choices, minimums and the keys' own rules."""
    problems = []
    for key, node, _ in spec.leaves(KEYS):
        value = _get(values, key)
        allowed = node.allowed()
        for item in (value if isinstance(value, list) else [value]) if allowed else []:
            if item is not None and item not in allowed:
                problems.append(f"{key}: {item!r} is not one of {', '.join(a for a in allowed if a)}")
        number = isinstance(node.default, (int, float)) and not isinstance(node.default, bool)
        if number and value < node.minimum:
            problems.append(f"{key}: {value} is below the minimum, {node.minimum}")
        problem = node.check(value) if node.check else None
        if problem:
            problems.append(f"{key}: {problem}")
    return problems


def _get(values, dotted):
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def _suggest(name, values):
    keys = list(_all_keys(values))
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.6)
    leaf = name.rsplit(".", 1)[-1]
    close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
    return f"; closest valid keys: {', '.join(close[:3])}" if close else ""


def _all_keys(tree, prefix=""):
    for k, v in tree.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _all_keys(v, f"{prefix}{k}.")
