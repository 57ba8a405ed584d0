"""recipes/lenet.py, but validating on the test split: what bench_time_to_accuracy measures.
Not for model selection (that is what the held-out val split of lenet.py is for)."""

from pathlib import Path

from toolkit import recipe

_lenet = recipe.load(Path(__file__).resolve().parents[1] / "recipes" / "lenet.py")
config, model, loss, metrics = _lenet.config, _lenet.model, _lenet.loss, _lenet.metrics


def datasets(cfg):
    splits = _lenet.datasets(cfg)
    return {"train": splits["train"], "val": splits["test"]}
