"""A property's verdict, its `Row`: measuring one property with what its work prints kept aside and
its errors turned into the row, and the lines that `launch.py check` prints for the rows."""

import contextlib
import dataclasses
import io
import time
import traceback

from toolkit import UserError


@dataclasses.dataclass
class Row:
    """One property's verdict."""

    name: str
    ok: bool | None  # None: not measured (skipped)
    found: str  # what was measured, in the user's terms
    fix: str = ""
    seconds: float = 0.0
    console: str = ""  # the traceback of a recipe's error

    @property
    def verdict(self):
        return "SKIP" if self.ok is None else "PASS" if self.ok else "FAIL"


class Failed(Exception):
    """A property does not hold: what was measured, the fix, and the console of the work that
    failed (another process's), shown after the rows."""

    def __init__(self, found, fix="", console=""):
        super().__init__(found)
        self.found, self.fix, self.console = found, fix, console


class Skipped(Exception):
    """A property that this recipe gives nothing to measure: why."""


def run_one(name, measure, check):
    """One property, what its work prints kept aside, and an error of the recipe's a FAIL."""
    console, start = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            row = Row(name, True, measure(check))
    except Failed as e:
        row = Row(name, False, e.found, e.fix, console=e.console)
    except Skipped as e:
        row = Row(name, None, str(e))
    except UserError as e:
        row = Row(name, False, str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - the recipe's own error: a FAIL, with its traceback
        row = Row(name, False, f"{type(e).__name__}: {e}".splitlines()[0],
                  console="".join(traceback.format_exception(e)))
    row.seconds = time.perf_counter() - start
    return row


def line(row):
    """A row as `launch.py check` prints it: property, verdict, time, what was measured."""
    return f"{row.name:<11} {row.verdict}  {row.seconds:5.1f}s  {row.found}"


def ending(rows):
    """What `launch.py check` prints after the rows: each FAIL's fix (and a recipe error's
    traceback), and the count."""
    lines = []
    for row in rows:
        if row.ok is False and (row.fix or row.console):
            lines += ["", f"{row.name}: {row.fix}" if row.fix else f"{row.name}: the recipe raised"]
            lines += ["    " + text for text in row.console.rstrip().splitlines()[-12:]]
    failed = [row.name for row in rows if row.ok is False]
    unmeasured = [row.name for row in rows if row.ok is None]
    lines += ["", f"{len(failed)} of {len(rows)} failed: {', '.join(failed)}" if failed else
              f"{len(rows) - len(unmeasured)} of {len(rows)} passed, not measured: {', '.join(unmeasured)}"
              if unmeasured else f"all {len(rows)} passed"]
    return "\n".join(lines)
