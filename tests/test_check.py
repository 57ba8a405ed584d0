"""`launch.py check`: the shipped recipes pass every property, and a recipe made to break one
property fails that row, and no other. The `input` row measures speed: on a busy machine any
recipe may wait for data, so it is asserted only where a test makes the input slow."""

import json
import re

import pytest
import torch

from helpers import LENET, REPO, RESNET, launch, make_cifar10

BROKEN = REPO / "tests" / "recipes" / "broken.py"
STREAM = REPO / "tests" / "recipes" / "stream.py"
WDS = REPO / "tests" / "recipes" / "wds_points.py"
NOISY = REPO / "tests" / "recipes" / "noisy.py"
PROPERTIES = ["contract", "repeatable", "samples", "summable", "learns", "resume", "input"]
SPEED = "input"


def verdicts(result):
    """{property: PASS, FAIL or SKIP} from what check printed."""
    rows = [line.split()[:2] for line in result.stdout.splitlines() if line.split()[:1] and
            line.split()[0] in PROPERTIES and line.split()[1:2] in (["PASS"], ["FAIL"], ["SKIP"])]
    assert [name for name, _ in rows] == PROPERTIES, result.stdout + result.stderr
    return dict(rows)


def failed(found, breaks=""):
    """The rows that failed, but the speed row where the test did not make the input slow."""
    return [name for name, verdict in found.items() if verdict == "FAIL" and (name != SPEED or breaks == SPEED)]


def ends(result, found):
    """check's exit status and last line say which rows failed, or were not measured."""
    fails, skips = ([name for name, verdict in found.items() if verdict == kind] for kind in ("FAIL", "SKIP"))
    assert result.returncode == (1 if fails else 0)
    assert result.stdout.rstrip().splitlines()[-1] == (
        f"{len(fails)} of 7 failed: {', '.join(fails)}" if fails else
        f"{7 - len(skips)} of 7 passed, not measured: {', '.join(skips)}" if skips else "all 7 passed"), result.stdout


@pytest.mark.parametrize("breaks", ["", *PROPERTIES])
def test_a_recipe_made_to_break_one_property_fails_that_row_alone(breaks, tmp_path):
    result = launch(["check", BROKEN, f"breaks={breaks}", "--processes", "1"], cwd=tmp_path)
    found = verdicts(result)
    assert failed(found, breaks) == ([breaks] if breaks else []), result.stdout
    ends(result, found)
    if breaks:
        assert f"\n{breaks}: " in result.stdout  # its fix
    if breaks == "contract":  # the rest would fail for the same reason
        assert set(found.values()) == {"FAIL", "SKIP"}


@pytest.mark.parametrize("how, fix", [
    ("stream=true breaks=samples", "read the whole stream in __iter__"),  # a stream that splits itself by rank
    ("per_process=true", "datasets() must give every process the same data"),  # val drawn with RANK
], ids=["stream", "map-style"])
def test_data_that_differs_per_process_fails_the_count_with_two_processes(how, fix, tmp_path):
    """With 1 process the evaluation reads the whole split; with 2, other samples than 1 does."""
    result = launch(["check", BROKEN, *how.split()], cwd=tmp_path)
    found = verdicts(result)
    assert failed(found) == ["samples"], result.stdout
    assert "with 2 processes: it reads other samples" in result.stdout, result.stdout
    assert f"samples: {fix}" in result.stdout


def test_learns_measures_the_model_that_the_run_starts_from(tmp_path):
    """stream.py's samples draw from torch's generator as they are read, and the run reads the ones
    it overfits before it makes the model: a model made right after the seed would start from other
    weights than the run's, and its loss would say nothing of what the steps did."""
    result = launch(["check", STREAM, "--processes", "1"], cwd=tmp_path)
    assert verdicts(result)["learns"] == "PASS", result.stdout
    start = float(re.search(r"the loss of the 128 train samples it trained on went from (\S+) to", result.stdout)[1])
    assert start > 100  # the run's first steps have losses in the hundreds; a model made after the seed, about 1.5


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory):
    """Shards for wds_points.py: train 70, 55, 61 and 48 points, val 37 and 29."""
    import webdataset as wds

    root, g = tmp_path_factory.mktemp("shards"), torch.Generator().manual_seed(0)
    for name, n in (("train-0", 70), ("train-1", 55), ("train-2", 61), ("train-3", 48), ("val-0", 37), ("val-1", 29)):
        with wds.TarWriter(str(root / f"{name}.tar")) as tar:
            for i, x in enumerate(torch.randn(n, 2, generator=g).tolist()):
                y = int((torch.atan2(torch.tensor(x[1]), torch.tensor(x[0])) + torch.pi) * 3 / (2 * torch.pi)) % 3
                tar.write({"__key__": f"{name}-{i:04d}", "json": json.dumps({"x": x, "y": y}).encode()})
    return root


@pytest.mark.parametrize("recipe, args, counted", [
    (STREAM, ["split_itself=true", "noise=false", "eval_batch_size=32", "--processes", "1"], "train 203 samples"),
    (WDS, [], "val 66 samples"),  # webdataset: 2 val shards, split by node and by worker
], ids=["stream_part", "webdataset"])
def test_a_short_stream_that_splits_itself_is_counted_whole(recipe, args, counted, wds_shards, tmp_path):
    """Each worker and process of a stream that splits itself reads shards of its own, so the first
    samples of a pass differ with their number: a stream of at most 8 evaluation batches is counted
    whole, and every way of reading it counts all its samples, with the same metrics."""
    args = [f"data.root={wds_shards}", *args] if recipe == WDS else args
    result = launch(["check", recipe, *args], cwd=tmp_path)
    found = verdicts(result)
    assert failed(found) == [], result.stdout + result.stderr[-3000:]
    ways = "0 and 2 workers" if "--processes" in args else "0 and 2 workers, and 2 processes"
    assert f"{counted}, counted once and with the same metrics with {ways}" in result.stdout


def test_the_count_with_two_processes_reads_with_the_recipe_s_workers(wds_shards, tmp_path):
    """2 val shards, 2 processes of 2 workers: a worker has no shard, and webdataset's empty_check
    fails in it, as it would in the run; the row names webdataset's error."""
    result = launch(["check", WDS, f"data.root={wds_shards}", "empty_check=true", "num_workers=2"], cwd=tmp_path)
    found = verdicts(result)
    assert failed(found) == ["samples"], result.stdout + result.stderr[-3000:]
    assert "the evaluation in 2 processes failed: ValueError: No samples found in dataset" in result.stdout


def test_a_sample_that_depends_on_its_worker_fails_the_count_with_workers(tmp_path):
    result = launch(["check", BROKEN, "per_worker=true", "--processes", "1"], cwd=tmp_path)
    found = verdicts(result)
    assert failed(found) == ["samples"], result.stdout
    assert "with 1 process and 2 workers: it reads other samples" in result.stdout
    assert "samples: a sample must depend on its index and the seed alone" in result.stdout


def test_a_long_stream_that_splits_itself_is_not_counted(tmp_path):
    """203 samples are more than 8 batches of 16: its first samples differ with the workers, and the
    row says that it could not count them, instead of a FAIL."""
    result = launch(["check", STREAM, "split_itself=true", "eval_batch_size=16", "--processes", "1"], cwd=tmp_path)
    found = verdicts(result)
    assert found["samples"] == "SKIP" and failed(found) == [], result.stdout
    assert "not counted: train (a stream of over 128 samples that splits itself" in result.stdout


def test_an_epoch_of_one_batch_leaves_the_data_wait_unmeasured(tmp_path):
    """The first step of an epoch waits for its batch with nothing to overlap it: with one train
    batch per epoch there is no step to measure the input by, and the row says so."""
    result = launch(["check", BROKEN, "points=16", "--processes", "1"], cwd=tmp_path)
    found = verdicts(result)
    assert list(found.values()) == ["PASS"] * 6 + ["SKIP"], result.stdout
    assert "2 steps unbroken against 1 steps, a stop, a resume and 1 more" in result.stdout
    ends(result, found)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return make_cifar10(tmp_path_factory.mktemp("cifar"))


SHIPPED = {
    "lenet": lambda mnist, cifar: [LENET, f"data.root={mnist}", "data.download=false", "data.val_size=500",
                                   "batch_size=32", "eval_batch_size=64", "num_workers=2"],
    "gpt": lambda mnist, cifar: [REPO / "recipes" / "gpt.py", "n_layer=1", "n_head=2", "n_embd=32", "block_size=32",
                                 "batch_size=16", "data.max_bytes=40000", "eval_batch_size=32"],
    "hf_classify": lambda mnist, cifar: [REPO / "recipes" / "hf_classify.py", "model.name=tiny", "data.name=stdlib",
                                         "optim.lr=1e-3", "data.max_lines=1000", "batch_size=16", "eval_batch_size=32"],
    "resnet_cifar": lambda mnist, cifar: [RESNET, f"data.root={cifar}", "data.download=false", "data.val_size=100",
                                          "depth=8", "precision=no", "batch_size=16", "eval_batch_size=32"],
}


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_recipes_pass(name, mnist_root, cifar_root, tmp_path):
    processes = "2" if name == "lenet" else "1"  # the count with 2 processes once: it starts torchrun
    result = launch(["check", *SHIPPED[name](mnist_root, cifar_root), "--processes", processes], cwd=tmp_path,
                    env={"OMP_NUM_THREADS": "1"})
    found = verdicts(result)
    assert failed(found) == [] and set(found.values()) <= {"PASS", "FAIL"}, result.stdout + result.stderr[-3000:]
    ends(result, found)
    if name == "lenet":  # with the recipe's DataLoader workers, and the count with 2 processes
        assert "(num_workers=2): all 10 weight tensors equal, bit for bit" in result.stdout
        assert "with 0 and 2 workers, and 2 processes" in result.stdout


def test_a_failed_count_with_two_processes_names_their_error_not_the_launcher_s():
    from toolkit.check.count import first_error

    console = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"task.py\", line 9, in datasets\n"
               "[rank1]: FileNotFoundError: [Errno 2] No such file or directory: 'data/train.txt'\n"
               "Traceback (most recent call last):\n  File \"run.py\", line 1142, in <module>\n"
               "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
               "=======================================================\n")
    assert first_error(console) == "FileNotFoundError: [Errno 2] No such file or directory: 'data/train.txt'"
    assert first_error("error: data.root: no such folder\n" + console) == "error: data.root: no such folder"
    assert first_error("Signal 6 (SIGABRT) received by PID 11547\n=====\n") == ""


@pytest.mark.parametrize("name", ["my_tensors.py", "my_images.py", "my_stream.py", "my_lm.py"])
def test_the_readme_recipes_pass(name, recipes):
    """The README's recipes for your own data, as written there, with their tiny data. With 60
    images, my_images.py's epochs hold one batch of 64: its data wait is not measured."""
    result = launch(["check", recipes / name, "--processes", "1"], cwd=recipes)
    found = verdicts(result)
    assert failed(found) == [], result.stdout + result.stderr[-3000:]
    assert found[SPEED] in (("SKIP",) if name == "my_images.py" else ("PASS", "FAIL")), result.stdout
    assert [verdict for row, verdict in found.items() if row != SPEED] == ["PASS"] * 6
    ends(result, found)


def test_metrics_are_compared_at_1e_4_in_float32_by_default(monkeypatch):
    """precision is null by default: float32 unless `accelerate launch` sets a mixed precision."""
    from toolkit.check.data_properties import tolerance_of
    from toolkit.config import resolve
    from toolkit.recipe import load

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    default = resolve(load(LENET).config, [], [])
    assert default.precision is None and tolerance_of(default) == 1e-4
    assert tolerance_of(resolve(load(LENET).config, [], ["precision=bf16"])) == 2e-2
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert tolerance_of(default) == 2e-2


def test_a_loss_that_draws_per_sample_in_evaluation_passes(tmp_path):
    """loss() adds noise in evaluation too, from each sample's generator (toolkit.data.draws): the
    metrics are the same with 0 and 2 workers, 2 processes and another eval_batch_size."""
    result = launch(["check", NOISY, "noise=per_sample"], cwd=tmp_path)
    assert failed(verdicts(result)) == [], result.stdout
    assert "counted once and with the same metrics with 0 and 2 workers, and 2 processes" in result.stdout


def test_a_loss_that_draws_per_batch_in_evaluation_fails_summable_with_that_cause(tmp_path):
    """Noise from the global generators, which evaluation seeds per batch: the same with any
    workers and processes, but not with another eval_batch_size; the row names the draws."""
    result = launch(["check", NOISY, "noise=global", "--processes", "1"], cwd=tmp_path)
    assert failed(verdicts(result)) == ["summable"], result.stdout
    assert "moves with the seeds of evaluation's draws: loss() or collate draws per batch in evaluation" \
        in result.stdout
    assert "summable: draw per sample with toolkit.data.draws" in result.stdout


def test_the_evaluation_rows_measure_a_trained_model_where_an_untrained_one_hides_the_draws(tmp_path):
    """The same per-batch noise, in a model that starts at zero: untrained, its metrics are those
    of constant outputs whatever the noise, so only a model trained a few steps shows the draws."""
    result = launch(["check", NOISY, "noise=global", "zero_init=true", "--processes", "1"], cwd=tmp_path)
    assert failed(verdicts(result)) == ["summable"], result.stdout
    assert "loss() or collate draws per batch in evaluation" in result.stdout


def test_a_loss_that_draws_in_evaluation_fails_with_that_cause(tmp_path):
    """loss() adds noise from the global generator in evaluation too: its metrics move with the
    generators' state, and the samples and summable rows say so, not that it reads other samples
    or sums a per-batch mean."""
    result = launch(["check", BROKEN, "draws=true", "--processes", "1"], cwd=tmp_path)
    found = verdicts(result)
    assert failed(found) == ["samples", "summable"], result.stdout
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()[1:2] == ["FAIL"]}
    for row in ("samples", "summable"):
        assert rows[row].endswith("loss() or collate draws random numbers in evaluation"), rows[row]
    assert "samples: draw only in training (if model.training: ...)" in result.stdout


def test_a_launcher_that_does_not_exist_is_one_line(tmp_path):
    result = launch(["check", NOISY, "--launcher", "nosuchlauncher --num_processes 2"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == \
        "error: --launcher 'nosuchlauncher --num_processes 2': no such command on this machine\n", result.stderr
