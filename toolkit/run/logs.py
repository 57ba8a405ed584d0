"""log.txt and the console: the `toolkit` logger, the progress bar, and how results are shown."""

import contextlib
import logging
import sys

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from toolkit.run.summary import Status

log = logging.getLogger("toolkit")
FILE_ONLY = {"file_only": True}  # `log.info(msg, extra=FILE_ONLY)`: into log.txt, not onto the console


@contextlib.contextmanager
def writing(run_dir, is_main):
    """The `toolkit` logger while a run lasts: on the main process, to the console (printed above
    the progress bar, by tqdm's logging redirect) and to <run_dir>/log.txt; elsewhere errors only,
    to stderr."""
    log.propagate = False
    if not is_main:
        log.setLevel(logging.ERROR)
        log.handlers = [logging.StreamHandler(sys.stderr)]
    else:
        log.setLevel(logging.INFO)
        to_file = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        to_console = logging.StreamHandler(sys.stderr)
        to_console.addFilter(lambda record: not getattr(record, "file_only", False))
        log.handlers = [to_file, to_console]
    try:
        with logging_redirect_tqdm(loggers=[log], tqdm_class=tqdm):
            yield log
    finally:
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)


def progress_bar(accelerator, total, initial, desc):
    """A bar on the main process of an interactive terminal; elsewhere none (log lines instead)."""
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True, leave=True,
                disable=None if accelerator.is_main_process else True)


def result_line(summary):
    """The last line of a run (a `toolkit.run.summary.Summary`): its final metrics (or how it ended), its
    time and where its folder is."""
    split = "test" if "test" in summary.metrics else "val" if "val" in summary.metrics else None
    if summary.status != Status.FINISHED:
        result = f"{summary.status} at epoch {summary.epochs} step {summary.steps}" + (
            f" ({summary.error})" if summary.error else "")
    else:
        result = f"{split} {format_metrics(summary.metrics[split], digits=6)}" if split else \
            f"trained {summary.steps} steps"
    return f"{result} | {summary.wall_time_s:.1f}s | run {summary.run_dir}"


def text_table(rows, headers):
    """Rows of strings as aligned columns."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [headers, *rows])


def format_metrics(metrics, digits=4):
    """`name=value ...`, floats to `digits` significant digits: 4 in the log's lines, 6 in a result
    line (enough to tell two runs apart)."""
    return " ".join(f"{k}={_fmt(v, digits)}" for k, v in metrics.items())


def _fmt(value, digits):
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)
