"""A search's space: `key=kind(...)` on the command line or in a `search:` block of a --config file,
with kind one of KINDS, checked against the recipe's config and turned into Optuna distributions.

    uniform(low,high), loguniform(low,high)   floats
    int(low,high), logint(low,high)           integers, both bounds included
    choice(a,b,...)                           values as they would be written after `key=`
"""

import re

from toolkit import UserError, config
from toolkit.jobs import launching

KINDS = ("uniform", "loguniform", "int", "logint", "choice")
SPEC = re.compile(r"\s*(\w+)\((.*)\)\s*", re.S)


def is_space(text):
    """Whether a value is a space: it starts with one of the KINDS and a parenthesis."""
    return text.strip().startswith(tuple(f"{kind}(" for kind in KINDS))


def read_space(files, overrides):
    """(config files without their search: block, fixed overrides, {key: spec text}) from the
    command line and the files; like sweep.read_grid."""
    plain_files, blocks, fixed, varying = launching.read_layers(files, overrides, "search", is_space)
    space = {}
    for path, block in blocks:
        if not isinstance(block, dict) or not all(isinstance(v, str) for v in block.values()):
            raise UserError(f"{path}: search: must map keys to spaces, e.g. optim.lr: loguniform(1e-4, 1e-1)")
        space.update(block)
    space.update(varying)
    if not space:
        raise UserError("nothing to search: give a space such as optim.lr=loguniform(1e-4,1e-1) on the command "
                        "line or in a search: block of a --config file")
    return plain_files, fixed, space


def check_space(recipe, files, fixed, space):
    """{key: Optuna distribution}; a ConfigError with one line per problem, each naming its key."""
    base = config.resolve(recipe.config, files, fixed)
    if not base.checkpoint.monitor:
        raise UserError("search needs an objective: set checkpoint.monitor, e.g. checkpoint.monitor=val/loss")
    defaults = base.flat()
    fixed_keys = {config.parse_override(text)[0]: text for text in fixed}
    problems, distributions = [], {}
    for key, spec in space.items():
        found = _distribution(key, spec, defaults.get(key), fixed_keys)
        if isinstance(found, str):
            problems.append(found)
            continue
        distributions[key], candidates = found
        # The values go through the config's own checks: unknown keys, types, choices, minimums.
        for text in candidates:
            try:
                layer = config.nest(key, text if isinstance(defaults.get(key), str) else
                                    config.yaml_load(text, f"{key}={spec}"))
                config.resolve(recipe.config, [*files, ("the search space", layer)], fixed)
            except config.ConfigError as e:
                problems += [p for p in e.problems if p not in problems]
    if problems:
        raise config.ConfigError(problems)
    return distributions


def _distribution(key, spec, default, fixed_keys):
    """(the Optuna distribution of `key=spec`, the values of it to check against the config: its
    bounds or choices), or the problem with it as a line of text."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"{key}={spec}"
    match = SPEC.fullmatch(str(spec))
    if not match or match.group(1) not in KINDS:
        return (f"{where}: expected {', '.join(f'{k}(...)' for k in KINDS)}, e.g. loguniform(1e-4,1e-1), "
                f"int(32,256) or choice(adam,sgd)")
    if key in ("output_dir", "name", "checkpoint.monitor", "checkpoint.mode"):
        return f"{where}: {key} cannot be searched (the search sets the folders and the objective)"
    if key in fixed_keys:
        return f"{where}: {key} is also fixed by {fixed_keys[key]}; keep one of them"
    kind, texts = match.group(1), [t.strip() for t in launching.values(match.group(2))]
    if kind == "choice":
        if len(texts) < 2 or "" in texts:
            return f"{where}: a choice needs two or more values, e.g. choice(adam,sgd)"
        return CategoricalDistribution(texts), texts
    numbers = [config.yaml_load(t, where) if t else None for t in texts]
    integer, log = kind in ("int", "logint"), kind.startswith("log")
    if len(numbers) != 2 or not all(isinstance(n, int if integer else (int, float)) and not isinstance(n, bool)
                                    for n in numbers):
        return f"{where}: expected {kind}(low,high) with two {'integers' if integer else 'numbers'}"
    low, high = numbers
    if not low < high:
        return f"{where}: the low bound {low} must be below the high bound {high}"
    if log and low <= 0:
        return f"{where}: a log scale needs a low bound above 0"
    if isinstance(default, (bool, str, list)) or (not integer and isinstance(default, int)):
        wanted = "int(...) or logint(...)" if isinstance(default, int) and not isinstance(default, bool) \
            else "choice(...)"
        return f"{where}: {key} takes {type(default).__name__} values, not {kind} ones; use {wanted}"
    if integer:
        return IntDistribution(low, high, log=log), [text_of(low), text_of(high)]
    return FloatDistribution(low, high, log=log), [text_of(float(low)), text_of(float(high))]


def text_of(value):
    """A sampled value as it is written on the command line: choices as given, numbers exactly."""
    return repr(float(value)) if isinstance(value, float) else str(value)
