"""The config: layers of defaults, the recipe's `config`, `--config` files and `key=value`
overrides, merged strictly into one read-only `Config`.

    keys.py    every key the toolkit reads, with its default, meaning and rules (its `spec.Key`)
    spec.py    what a key's spec is
    layers.py  the merge of the layers and its checks: `resolve`
    files.py   YAML 1.2 reading and writing
    table.py   the table of keys in docs/config.md (`python -m toolkit.config`)
"""

from toolkit.config.errors import ConfigError
from toolkit.config.files import yaml_dump, yaml_load
from toolkit.config.keys import DEFAULTS
from toolkit.config.layers import Config, changes, diff, nest, parse_override, resolve
from toolkit.config.table import markdown_table

__all__ = ["Config", "ConfigError", "DEFAULTS", "changes", "diff", "markdown_table", "nest", "parse_override",
           "resolve", "yaml_dump", "yaml_load"]
