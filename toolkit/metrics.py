"""Exact metrics from summable counts.

A recipe's `loss(model, batch, cfg)` returns `(loss, counts)`: `counts["samples"]` is the number of
samples in the batch and the other counts are sums over them (e.g. `correct`, `tokens`). The loss
is a mean over the batch's samples, or, with `loss_per=<count>`, over that count (e.g. tokens).
`Totals` adds the counts up on the device, batch after batch, without reading them back; `reduce`
then sums them over all ranks in one all-reduce. Ratios are taken only at the end (`summarize`),
so the result is the exact figure over every sample seen, whatever the batch sizes and the
number of processes.
"""

import contextlib
import os
import resource
import sys
import time

import torch
from accelerate.utils import gather_object

from toolkit import UserError


def exact_dtype(device):
    return torch.float32 if device.type == "mps" else torch.float64  # exact counts up to 2**53


def per_sample(counts):
    """A recipe's metrics when it has no `metrics` hook: each summed count divided by the samples."""
    return {k: v / counts["samples"] for k, v in counts.items() if k != "samples"}


class Totals:
    def __init__(self, per="samples"):
        self.per = per  # the count the loss is a mean over
        self.sums = {}

    def add(self, loss, counts):
        """Add one batch. No host sync: tensors stay on the device (plain numbers, such as a
        `len(labels)` sample count, are summed on the host, which costs no device op)."""
        if not self.sums:
            check_counts(counts, self.per)
        self._add("loss", loss.detach() * counts[self.per])  # the loss is a mean: weight it
        for key, value in counts.items():
            self._add(key, value.detach() if torch.is_tensor(value) else value)

    def _add(self, key, value):
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone() if torch.is_tensor(value) else value

    def reduce(self, accelerator):
        """Sums over all ranks as Python floats, and start again from zero.

        Every rank must call this at the same point (it is a collective). A rank that saw no batch
        still takes part: the names of the counts are agreed first, so it contributes zeros.
        """
        names = sorted(self.sums)
        if accelerator.num_processes > 1:
            names = sorted(set(gather_object(names)))
        if not names:  # no batch on any rank
            return {}
        dtype = exact_dtype(accelerator.device)
        zero = torch.zeros((), dtype=dtype, device=accelerator.device)
        stacked = torch.stack([torch.as_tensor(self.sums[k], device=accelerator.device).to(dtype)
                               if k in self.sums else zero for k in names])
        values = accelerator.reduce(stacked, reduction="sum").tolist()  # the host sync
        self.sums = {}
        return dict(zip(names, values))


class Window:
    """The train metrics of the steps since the last `read`: the loss and counts summed on the
    device (as in `Totals`), the mean gradient norm of the steps that measured one, the skipped
    steps, the throughput over the window's training time (anything else, such as a validation or
    a save, runs `paused()`), the fraction of it spent waiting for the loader (`data_wait`, on the
    main process: its batches pass through `timed`), and the memory (`memory`). All of it is read
    on the host: no device sync but the one of `read`. A checkpoint keeps the window so far
    (`carried`), and a resumed run goes on with it (`carry_on`): its windows are the unbroken run's."""

    def __init__(self, per, device, recipe_metrics=per_sample, flops_per_unit=0, peak_flops=0):
        self.per, self.recipe_metrics = per, recipe_metrics
        self.flops_per_unit, self.peak_flops = flops_per_unit, peak_flops  # for the MFU, where both are known
        self.totals = Totals(per)
        self.norm, self.measured, self.skipped = torch.zeros((), device=device), 0, 0
        self.restart()

    def add(self, loss, counts):
        """One micro-batch's loss and counts."""
        self.totals.add(loss, counts)

    def step(self, grad_norm, updated):
        """One optimizer step: its gradient norm (None where not measured), and whether it updated."""
        self.skipped += not updated
        if grad_norm is not None and updated:
            self.norm += grad_norm.detach().float()
            self.measured += 1

    def timed(self, batches):
        """`batches`, with the time spent waiting for each added to the window's `waited`."""
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(batches, _END)
            self.waited += time.perf_counter() - start
            if batch is _END:
                return
            yield batch

    def restart(self):
        self.start, self.waited = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent in the block is not the window's training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def carried(self, accelerator):
        """The window so far, for a checkpoint: its sums over all ranks (a collective: call on every
        rank), which stay on the main process only, and its steps' norms, skips and times."""
        sums = self.totals.reduce(accelerator)
        if accelerator.is_main_process:
            self.totals.sums = dict(sums)
        return {"sums": sums, "norm": self.norm.item(), "measured": self.measured, "skipped": self.skipped,
                "seconds": time.perf_counter() - self.start, "waited": self.waited}

    def carry_on(self, carried, accelerator):
        """Go on with a checkpoint's window (`carried`; empty: a new window), as the run that saved it."""
        if not carried:
            return
        if accelerator.is_main_process:
            self.totals.sums = dict(carried["sums"])
        self.norm.fill_(carried["norm"])
        self.measured, self.skipped, self.waited = carried["measured"], carried["skipped"], carried["waited"]
        self.start = time.perf_counter() - carried["seconds"]

    def read(self, accelerator, lr):
        """The window's metrics over all ranks (a collective, and the host sync); a new window starts."""
        sums = self.totals.reduce(accelerator)
        seconds = time.perf_counter() - self.start
        metrics = summarize(sums, self.recipe_metrics, self.per)
        metrics["skipped_steps"] = self.skipped
        if self.measured:
            metrics["grad_norm"] = self.norm.item() / self.measured
        metrics.update(lr=lr, samples_per_s=sums.get("samples", 0) / seconds, data_wait=min(1.0, self.waited / seconds),
                       **memory(accelerator.device))
        if self.per != "samples":
            metrics[f"{self.per}_per_s"] = sums.get(self.per, 0) / seconds
            if self.flops_per_unit and self.peak_flops:
                metrics["mfu"] = self.flops_per_unit * metrics[f"{self.per}_per_s"] / self.peak_flops
        self.norm.zero_()
        self.measured = self.skipped = 0
        self.restart()
        return metrics


_END = object()


def memory(device):
    """On a GPU, the peak memory that torch allocated and reserved since the last call (GB); on a
    CPU, this process's resident memory now (GB). Host-side counters: no device sync."""
    if device.type == "cuda":
        peaks = {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                 "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
        torch.cuda.reset_peak_memory_stats(device)
        return peaks
    try:
        with open("/proc/self/statm", encoding="ascii") as f:  # Linux: pages, the second number resident
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # elsewhere the peak, which is what getrusage knows (bytes on macOS, KiB on the others)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        resident = peak if sys.platform == "darwin" else peak * 1024
    return {"rss_gb": resident / 1e9}


def check_counts(counts, per="samples"):
    if not isinstance(counts, dict) or "samples" not in counts:
        raise UserError("the recipe's loss() must return counts with a 'samples' entry "
                        "(the number of samples in the batch), e.g. {'samples': len(labels)}")
    if per not in counts:
        raise UserError(f"loss_per={per}: the recipe's loss() returned no {per!r} count; it returned "
                        f"{', '.join(counts)}")


def summarize(sums, recipe_metrics=per_sample, per="samples"):
    """Reported numbers from summed counts: the recipe's metrics of them, the mean loss (per sample,
    or per `per`) and the sample count."""
    samples = sums.get("samples", 0)
    if not samples:
        return {"samples": 0}
    extra = recipe_metrics({k: v for k, v in sums.items() if k != "loss"})
    loss = sums["loss"] / sums[per] if sums.get(per) else float("nan")
    return {**extra, "loss": loss, "samples": int(samples)}
