"""Any data a recipe brings: tensors in memory, files with per-sample transforms and workers, a
stream without a length, and losses that are means over tokens. The recipes are the README's
own (section "Your own data"), run as written there."""

import collections
import importlib.util
import json
import sys

import pytest
import torch

from helpers import REPO, assert_same_weights, launch, launch_two, ok, only_run, read_jsonl, summary, weights
from toolkit.data.mapstyle import SeededSamples
from toolkit.state import checkpoint

STREAM = REPO / "tests" / "recipes" / "stream.py"


def run(args, cwd, processes=1):
    return ok(launch_two(args, cwd) if processes == 2 else launch(args, cwd))


@pytest.mark.parametrize("name, args, val_samples", [
    ("my_tensors.py", ["epochs=3"], 500),
    ("my_stream.py", ["max_steps=30"], 100),
], ids=["tensors", "stream"])  # my_images.py and my_lm.py: see the tests below
def test_the_readme_recipes_train(recipes, tmp_path, name, args, val_samples):
    run([recipes / name, *args, "trackers=[]", "log_every=2", f"output_dir={tmp_path}"], cwd=recipes)
    final = summary(only_run(tmp_path))
    train = [r for r in read_jsonl(only_run(tmp_path) / "metrics.jsonl") if r["split"] == "train"]
    assert final["status"] == "finished" and final["val"]["samples"] == val_samples
    assert train[-1]["loss"] < train[0]["loss"]


# ---------------------------------------------------------------------------------------------
# Per-sample randomness

class Draws(torch.utils.data.Dataset):
    """Sample i is (i, a torch draw, a numpy draw, a `random` draw), as a transform would make it."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        import random

        import numpy

        return torch.tensor([i, torch.rand(()).item(), numpy.random.rand(), random.random()], dtype=torch.float64)


def draws(seed, epoch, workers, order):
    dataset = SeededSamples(Draws(), seed)
    dataset.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, sampler=order, num_workers=workers,
                                         persistent_workers=workers > 0, generator=torch.Generator())  # as the loop's
    rows = torch.cat(list(loader))
    return {int(row[0]): row[1:].tolist() for row in rows}


def test_each_sample_draws_from_seed_epoch_and_index():
    base = draws(seed=0, epoch=3, workers=0, order=range(64))
    assert draws(seed=0, epoch=3, workers=2, order=list(reversed(range(64)))) == base  # any workers and order
    assert draws(seed=0, epoch=3, workers=0, order=range(30, 50)) == {i: base[i] for i in range(30, 50)}  # resumed
    assert len({tuple(v) for v in base.values()}) == 64  # every sample draws differently ...
    for other in (draws(seed=0, epoch=4, workers=0, order=range(64)),
                  draws(seed=1, epoch=3, workers=0, order=range(64))):
        assert all(other[i][k] != base[i][k] for i in range(64) for k in range(3))  # ... each epoch and seed too

    # Loading in the main process leaves the training step's random generators where they were.
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    draws(seed=0, epoch=3, workers=0, order=range(64))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("stream", [False, True], ids=["map-style", "stream"])
def test_evaluation_draws_per_sample_give_the_same_test_with_any_batch_and_workers(tmp_path, stream):
    """A collate that masks inputs and a loss that adds noise, in evaluation too, each sample from its
    own generator (toolkit.data.draws): the run's own final test (eval_batch_size 24, 2 workers) and
    `launch.py test` of its last checkpoint (eval_batch_size 5, no worker) give the same metrics (the
    loss to float rounding: its sum is taken in other batches), whether the test split is map-style
    data or a stream (whose samples' places in the pass seed their draws)."""
    noisy = REPO / "tests" / "recipes" / "noisy.py"
    ok(launch([noisy, "num_workers=2", f"stream={str(stream).lower()}", f"output_dir={tmp_path}"], cwd=tmp_path))
    run = only_run(tmp_path)
    result = launch(["test", run, "--checkpoint", "latest", "eval_batch_size=5", "num_workers=0"], cwd=tmp_path)
    ok(result)
    tested, own = json.loads(next(run.glob("test-step-*.json")).read_text())["test"], summary(run)["test"]
    assert (tested["samples"], tested["accuracy"]) == (own["samples"], own["accuracy"])
    assert tested["loss"] == pytest.approx(own["loss"], rel=1e-6)


@pytest.mark.parametrize("processes", [1, 2])
def test_image_folder_with_workers_resumes_bit_for_bit(recipes, tmp_path, processes):
    """RandomCrop + flip in ImageFolder, num_workers=2: 1. train 3 epochs; 2. the same, stopped in
    epoch 2; 3. resume it; 4. the weights are the unbroken run's, bit for bit."""
    common = [recipes / "my_images.py", "batch_size=8", "epochs=3", "num_workers=2", "trackers=[]",
              "checkpoint.monitor="]
    run([*common, f"output_dir={tmp_path / 'unbroken'}"], recipes, processes)
    run([*common, f"output_dir={tmp_path / 'stopped'}", f"max_steps={10 // processes}"], recipes, processes)
    stopped = only_run(tmp_path / "stopped")
    assert 0 < checkpoint.read_state(checkpoint.find(stopped)).batch  # in the middle of an epoch
    run(["resume", stopped, "max_steps=0"], recipes, processes)
    assert_same_weights(weights(only_run(tmp_path / "unbroken")), weights(stopped))


# ---------------------------------------------------------------------------------------------
# Token losses

def test_a_step_of_token_losses_is_the_one_big_batch(recipes, tmp_path):
    """Padded lines of different lengths, plain SGD, 50 steps: batch 64, 32 x 2 micro-batches and
    2 processes x 32 train the same weights with loss_per=tokens; not without it."""
    common = [recipes / "my_lm.py", "optim.name=sgd", "optim.momentum=0", "optim.lr=0.5", "max_steps=50",
              "epochs=10", "val_every=0", "checkpoint.monitor=", "checkpoint.every_epochs=0", "trackers=[]"]
    setups = {"64": (["batch_size=64"], 1), "32x2": (["batch_size=32", "grad_accum=2"], 1),
              "2x32": (["batch_size=32"], 2)}
    trained = {}
    for per in ("tokens", ""):
        for name, (args, processes) in setups.items():
            if per or name == "32x2":
                run([*common, *args, f"loss_per={per}", f"output_dir={tmp_path / per / name}"], recipes, processes)
                trained[per, name] = weights(only_run(tmp_path / per / name))

    def differ(a, b):
        return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)

    assert differ(trained["tokens", "64"], trained["tokens", "32x2"]) <= 1e-5
    assert differ(trained["tokens", "64"], trained["tokens", "2x32"]) <= 1e-5
    assert differ(trained["tokens", "64"], trained["", "32x2"]) > 1e-4  # a mean of means is another step
    train = [r for r in read_jsonl(only_run(tmp_path / "tokens" / "32x2") / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in train)


def test_loss_per_names_a_count_the_loss_returns(recipes, tmp_path):
    result = launch([recipes / "my_lm.py", "loss_per=token", "trackers=[]", f"output_dir={tmp_path}"], cwd=recipes)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("error: loss_per=token: the recipe's loss() returned no 'token' "
                                              "count; it returned samples, tokens")


# ---------------------------------------------------------------------------------------------
# Streams

def read_probe(path, processes):
    return [[json.loads(line) for line in open(f"{path}.rank{rank}")] for rank in range(processes)]


def trained_samples(run_dir):
    """Samples counted in the train windows of metrics.jsonl."""
    return sum(record["samples"] for record in read_jsonl(run_dir / "metrics.jsonl") if record["split"] == "train")


def train_stream(folder, processes, *args):
    """Two passes over the probe stream; returns (its run folder, each rank's records)."""
    run([STREAM, f"probe={folder / 'p'}", "epochs=2", "trackers=[]", "log_every=3", f"output_dir={folder}", *args],
        folder, processes)
    return only_run(folder), read_probe(folder / "p", processes)


@pytest.fixture(scope="module")
def one_process_stream(tmp_path_factory):
    return train_stream(tmp_path_factory.mktemp("stream"), 1, "batch_size=16", "num_workers=2")


@pytest.mark.parametrize("processes", [1, 2], ids=["1-process-2-workers", "2-processes-split-by-the-stream"])
def test_a_stream_trains_every_sample_once_per_pass(one_process_stream, tmp_path, processes):
    run_dir, records = one_process_stream if processes == 1 else \
        train_stream(tmp_path, 2, "batch_size=8", "split_itself=true")
    assert trained_samples(run_dir) == 2 * 203  # counted once per pass, padding not counted
    assert {i for rank in records for batch in rank for i in batch["index"]} == set(range(203))


def test_a_stream_resumes_exactly_with_two_processes_and_workers(one_process_stream, tmp_path):
    """2 processes x 2 workers: 1. train 2 passes, recording every batch; 2. the same, stopped in
    the middle of the first pass; 3. resume it; 4. the same batches and weights as the unbroken
    run. The unbroken run also shows every sample once per pass, with the augmentation noise a
    single process draws for it."""
    common = [STREAM, "epochs=2", "batch_size=8", "num_workers=2", "trackers=[]", "log_every=3"]
    run([*common, f"probe={tmp_path / 'u'}", f"output_dir={tmp_path / 'unbroken'}"], tmp_path, 2)
    run([*common, f"probe={tmp_path / 's'}", f"output_dir={tmp_path / 'stopped'}", "max_steps=5"], tmp_path, 2)
    stopped = only_run(tmp_path / "stopped")
    run(["resume", stopped, "max_steps=0"], tmp_path, 2)

    unbroken = read_probe(tmp_path / "u", 2)
    assert read_probe(tmp_path / "s", 2) == unbroken
    assert_same_weights(weights(only_run(tmp_path / "unbroken")), weights(stopped))
    assert trained_samples(only_run(tmp_path / "unbroken")) == 2 * 203

    def noise(records):
        """Each sample's noise draws over both passes."""
        draws = collections.defaultdict(set)
        for batch in (batch for rank in records for batch in rank):
            for i, value in zip(batch["index"], batch["noise"]):
                draws[i].add(value)
        return draws

    assert noise(one_process_stream[1]) == noise(unbroken)  # the same draws with 1 process
    assert all(len(values) == 2 for values in noise(unbroken).values())  # and new ones each pass


def test_a_stream_that_yields_nothing_is_one_line_on_every_process(tmp_path):
    result = launch_two([STREAM, "empty=true", "trackers=[]", f"output_dir={tmp_path}"], cwd=tmp_path, timeout=120,
                        fresh=True)
    assert result.returncode != 0
    assert "error: the train split (an IterableDataset) yielded no sample in this pass" in result.stderr


def test_a_stream_without_max_steps_refuses_a_schedule_that_needs_its_length(tmp_path):
    result = launch([STREAM, "sched.name=cosine", "trackers=[]", f"output_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("error: sched.name=cosine needs the length of an epoch, but the train split (Numbers) "
                             "is a stream without one: set max_steps (with cosine, linear, onecycle or exponential), "
                             "use sched.warmup_steps, or give the dataset a __len__\n")
    assert not (tmp_path / "stream").exists()


def test_fast_run_takes_the_readme_stream_pattern(tmp_path):
    """debug.fast_run on a stream with a schedule that needs the run's length (max_steps): one step,
    a checkpoint saved and loaded back."""
    result = ok(launch([STREAM, "sched.name=cosine", "max_steps=300", "debug.fast_run=true", "trackers=[]",
                        f"output_dir={tmp_path}"], cwd=tmp_path))
    final = summary(only_run(tmp_path))
    assert final["status"] == "finished" and final["steps"] == 1
    assert "checkpoint saved and loaded back" in result.stderr


# ---------------------------------------------------------------------------------------------
# Streams of the libraries users bring

# litdata's optimized chunks and MosaicML's MDS shards: written by each recipe's write(). MosaicML's
# `mosaicml-streaming` pins transformers<5, so the [dev] extra cannot hold it: .ci/run installs it
# without its dependencies (it imports transformers for one class), and without it its tests skip.
LIBRARY_RECIPES = {"litdata": "litdata_points.py", "mosaicml": "mosaic_points.py"}


@pytest.fixture(scope="module", params=list(LIBRARY_RECIPES))
def library_points(request, tmp_path_factory):
    if request.param == "mosaicml" and importlib.util.find_spec("streaming") is None:  # installed: it must import
        pytest.skip("mosaicml-streaming is not installed: .ci/run says how (it pins transformers<5)")
    recipe = REPO / "tests" / "recipes" / LIBRARY_RECIPES[request.param]
    sys.path.insert(0, str(recipe.parent))
    module = __import__(recipe.stem)
    folder = tmp_path_factory.mktemp(request.param)
    module.write(folder)
    return [recipe, f"data_dir={folder}"]


def test_a_library_stream_counts_every_sample_once_with_two_processes_and_workers(library_points, tmp_path):
    """litdata's StreamingDataset and MosaicML's, built as their docs say (where they split
    themselves, evening the parts by dropping or repeating samples): 2 processes x 2 workers read
    them as map-style data (7 steps of 2 x 16 per pass of 203 samples: the last step's batches
    filled up with repeats, as for any map-style data) and test each of the 101 samples once;
    `test` in one process, without workers, gives the same test metrics."""
    run([*library_points, "num_workers=2", f"output_dir={tmp_path}"], tmp_path, 2)
    trained = only_run(tmp_path)
    assert trained_samples(trained) == 2 * 7 * 32 and summary(trained)["test"]["samples"] == 101
    ok(launch(["test", trained, "--checkpoint", "latest", "num_workers=0", "eval_batch_size=7"], cwd=tmp_path))
    tested, own = json.loads(next(trained.glob("test-step-*.json")).read_text())["test"], summary(trained)["test"]
    assert (tested["samples"], tested["accuracy"]) == (own["samples"], own["accuracy"])
    assert tested["loss"] == pytest.approx(own["loss"], rel=1e-6)


def test_a_library_stream_resumes_bit_for_bit(library_points, tmp_path):
    """With 2 workers: 1. train 2 passes; 2. the same, stopped mid-pass; 3. resume it; 4. the
    weights are the unbroken run's, bit for bit."""
    common = [*library_points, "num_workers=2"]
    run([*common, f"output_dir={tmp_path / 'unbroken'}"], tmp_path)
    run([*common, f"output_dir={tmp_path / 'stopped'}", "max_steps=5"], tmp_path)
    stopped = only_run(tmp_path / "stopped")
    assert checkpoint.read_state(checkpoint.find(stopped)).batch == 5  # mid-pass (13 batches)
    run(["resume", stopped, "max_steps=0"], tmp_path)
    assert_same_weights(weights(only_run(tmp_path / "unbroken")), weights(stopped))
