"""`launch.py check` itself: the recipe loaded, and every property measured on it in order, in a
temporary folder that the training runs go to."""

import tempfile
from pathlib import Path

from toolkit import UserError
from toolkit.check.data_properties import CONTRACT, contract, repeatable, samples, summable
from toolkit.check.rows import Row, line, run_one
from toolkit.check.training_properties import input_bound, learns, resume
from toolkit.check.work import Check

PROPERTIES = [("contract", contract), ("repeatable", repeatable), ("samples", samples), ("summable", summable),
              ("learns", learns), ("resume", resume), ("input", input_bound)]


def check(path, files=(), overrides=(), processes=2, say=print, launcher=""):
    """Measure every property of the recipe at `path` with its config; `say` each row's line as it
    is measured; return the rows. A recipe that breaks the contract skips the others, which would
    fail for the same reason. With a `launcher`, the training runs are its processes."""
    from toolkit import recipe as recipes

    if not Path(path).is_file() or Path(path).suffix != ".py":
        recipes.load(path)  # no recipe to check: the command's one-line error
    try:
        recipe = recipes.load(path)
    except recipes.RecipeError:
        raise  # it does not import: its traceback, as a run shows it
    except UserError as e:
        recipe, broken = None, Row("contract", False, str(e), CONTRACT)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minloop-check-") as folder:
        checked = Check(recipe, files, overrides, folder, processes, launcher) if recipe else None
        for name, measure in PROPERTIES:
            if checked is None and not rows:
                row = broken
            elif rows and rows[0].ok is False:
                row = Row(name, None, "the contract must hold first")
            else:
                row = run_one(name, measure, checked)
            rows.append(row)
            say(line(row))
    return rows
