"""Exact metrics from summable counts.

A recipe's `loss(model, batch, cfg)` returns `(loss, counts)`: `counts["samples"]` is the number of
samples in the batch and the other counts are sums over them (e.g. `correct`). `Totals` adds them
up on the device, batch after batch, without reading them back; `reduce` then sums them over all
ranks in one all-reduce. Ratios are taken only at the end (`summarize`), so the result is the
exact figure over every sample seen, whatever the batch sizes and the number of processes.
"""

import torch
from accelerate.utils import gather_object

from toolkit import UserError


class Totals:
    def __init__(self):
        self.sums = {}

    def add(self, loss, counts):
        """Add one batch. No host sync: tensors stay on the device (plain numbers, such as a
        `len(labels)` sample count, are summed on the host, which costs no device op)."""
        if not self.sums and "samples" not in counts:
            raise UserError("the recipe's loss() must return counts with a 'samples' entry "
                            "(the number of samples in the batch), e.g. {'samples': len(labels)}")
        self._add("loss", loss.detach() * counts["samples"])  # the loss is a batch mean: weight it
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
        dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64  # exact counts up to 2**53
        zero = torch.zeros((), dtype=dtype, device=accelerator.device)
        stacked = torch.stack([torch.as_tensor(self.sums[k], device=accelerator.device).to(dtype)
                               if k in self.sums else zero for k in names])
        values = accelerator.reduce(stacked, reduction="sum").tolist()  # the host sync
        self.sums = {}
        return dict(zip(names, values))


def summarize(sums, recipe_metrics=None):
    """Reported numbers from summed counts: mean loss, sample count, then the recipe's metrics
    (by default each count divided by the number of samples)."""
    samples = sums.get("samples", 0)
    if not samples:
        return {"samples": 0}
    counts = {k: v for k, v in sums.items() if k != "loss"}
    if recipe_metrics is not None:
        extra = recipe_metrics(counts)
    else:
        extra = {k: v / samples for k, v in counts.items() if k != "samples"}
    return {**extra, "loss": sums["loss"] / samples, "samples": int(samples)}
