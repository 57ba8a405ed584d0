"""`python -m toolkit.config`: the table of every config key, for docs/config.md."""

from toolkit.config.table import markdown_table

print(markdown_table())
