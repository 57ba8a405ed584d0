"""metrics.jsonl and the trackers in one call: every logged train window and evaluation goes, on the
main process, as one JSON object per line into <run>/metrics.jsonl, and as the same numbers to each
of Accelerate's trackers (made by toolkit.run.trackers)."""

import json
import time


class Metrics:
    """metrics.jsonl plus Accelerate's trackers (TRACKERS): one call logs to all; as a
    context manager, closes them all at its end.

    On resume, `keep_lines` cuts metrics.jsonl back to what the checkpoint had seen (and the trackers
    that keep local files drop what they logged after its step), so nothing appears twice.
    """

    def __init__(self, accelerator, run_dir, keep_lines=None):
        self.accelerator = accelerator
        self.file, self.lines = None, 0
        if accelerator.is_main_process:
            path = run_dir / "metrics.jsonl"
            if keep_lines is not None:
                kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep_lines] if path.exists() else []
                path.write_text("".join(kept), encoding="utf-8")
            self.file = open(path, "a", encoding="utf-8")
            self.lines = keep_lines or 0
        self.start = time.time()
        accelerator.init_trackers("runs")  # starts the trackers made by make_trackers

    def log(self, split, metrics, step, epoch):
        if self.file is not None:
            record = {"step": step, "epoch": epoch, "split": split, **metrics,
                      "time": round(time.time() - self.start, 3)}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.lines += 1
        self.accelerator.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Flush and close metrics.jsonl and every tracker (e.g. tensorboard's event files)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
