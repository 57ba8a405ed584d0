from types import SimpleNamespace

import pytest
import torch

from toolkit import UserError
from toolkit.metrics import Totals, summarize

ONE_PROCESS = SimpleNamespace(num_processes=1, device=torch.device("cpu"),
                              reduce=lambda tensor, reduction: tensor)


def test_totals_are_exact_over_uneven_batches():
    torch.manual_seed(0)
    labels, predictions = torch.randint(0, 3, (1001,)), torch.randint(0, 3, (1001,))
    losses = torch.rand(1001)
    totals = Totals()
    for chunk in torch.arange(1001).split(64):  # the last batch has 41 samples
        correct = (predictions[chunk] == labels[chunk]).sum()
        totals.add(losses[chunk].mean(), {"correct": correct, "samples": len(chunk)})
    result = summarize(totals.reduce(ONE_PROCESS), lambda t: {"accuracy": t["correct"] / t["samples"]})
    assert result["samples"] == 1001
    assert result["accuracy"] == (predictions == labels).sum().item() / 1001
    assert result["loss"] == pytest.approx(losses.double().mean().item(), rel=1e-6)
    assert totals.sums == {}  # reduce starts a new window


def test_default_metrics_divide_each_count_by_samples():
    sums = {"loss": 5.0, "samples": 10.0, "hits": 4.0}
    assert summarize(sums) == {"hits": 0.4, "loss": 0.5, "samples": 10}
    assert summarize({}) == {"samples": 0}


def test_counts_must_include_samples():
    with pytest.raises(UserError, match="'samples' entry"):
        Totals().add(torch.tensor(1.0), {"correct": torch.tensor(3)})
