"""Config files in YAML 1.2 (the core schema) on top of PyYAML, which implements YAML 1.1: `1e-4` is a
float, `yes`/`on` stay text and `12:30` is not a number. The same rules read `--config` files,
command-line values and the saved `config.yaml`."""

import re

import yaml

from toolkit.config.errors import ConfigError


_YAML12 = [
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", "~nN"),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
     r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
]


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    """Quotes any text that either YAML 1.1 or 1.2 would read as something else."""

    def ignore_aliases(self, data):
        return True


_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in _YAML12:
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
    _Dumper.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
_Loader.add_constructor("tag:yaml.org,2002:int",
                        lambda loader, node: int(node.value, 16 if "x" in node.value else 10))
_Loader.add_constructor("tag:yaml.org,2002:float",
                        lambda loader, node: float(node.value.lower().replace(".inf", "inf").replace(".nan", "nan")))


def yaml_load(text, source):
    """Parse YAML text with the 1.2 rules; errors name `source` and the position."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{source}: invalid YAML{where}: {problem}"]) from None


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))  # lists on one line: [a, b]


def yaml_dump(values):
    return yaml.dump(values, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def short(value):
    text = yaml_dump(value).strip() if not isinstance(value, str) else value
    text = text.removesuffix("\n...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def show(value):
    if value is None:
        return "null"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"
