"""`launch.py check`: the shipped recipes pass every property, and a recipe made to break one
property fails that row, and no other."""

import pytest

from helpers import LENET, REPO, RESNET, launch, make_cifar10

BROKEN = REPO / "tests" / "recipes" / "broken.py"
PROPERTIES = ["contract", "repeatable", "samples", "summable", "learns", "resume", "input"]


def verdicts(result):
    """{property: PASS, FAIL or SKIP} from what check printed."""
    rows = [line.split()[:2] for line in result.stdout.splitlines() if line.split()[:1] and
            line.split()[0] in PROPERTIES and line.split()[1:2] in (["PASS"], ["FAIL"], ["SKIP"])]
    assert [name for name, _ in rows] == PROPERTIES, result.stdout + result.stderr
    return dict(rows)


@pytest.mark.parametrize("breaks", ["", *PROPERTIES])
def test_a_recipe_made_to_break_one_property_fails_that_row_alone(breaks, tmp_path):
    result = launch(["check", BROKEN, f"breaks={breaks}", "--processes", "1"], cwd=tmp_path)
    found = verdicts(result)
    failed = [name for name, verdict in found.items() if verdict == "FAIL"]
    assert failed == ([breaks] if breaks else []), result.stdout
    assert result.returncode == (1 if breaks else 0)
    if breaks:
        assert f"\n{breaks}: " in result.stdout  # its fix
        assert result.stdout.rstrip().endswith(f"1 of 7 failed: {breaks}")
    if breaks == "contract":  # the rest would fail for the same reason
        assert set(found.values()) == {"FAIL", "SKIP"}


def test_a_stream_that_splits_itself_by_rank_fails_the_count_with_two_processes(tmp_path):
    """With 1 process it reads the whole stream; with 2, each reads other samples than 1 does."""
    result = launch(["check", BROKEN, "stream=true", "breaks=samples"], cwd=tmp_path)
    found = verdicts(result)
    assert [name for name, verdict in found.items() if verdict == "FAIL"] == ["samples"], result.stdout
    assert "with 2 processes: it reads other samples" in result.stdout, result.stdout


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
    assert set(verdicts(result).values()) == {"PASS"}, result.stdout + result.stderr[-3000:]
    assert result.returncode == 0
    if name == "lenet":  # with the recipe's DataLoader workers, and the count with 2 processes
        assert "(num_workers=2): all 10 weight tensors equal, bit for bit" in result.stdout
        assert "with 0 and 2 workers, and 2 processes" in result.stdout


def test_a_failed_count_with_two_processes_names_their_error_not_the_launcher_s():
    from toolkit.doctor import first_error

    console = ("Traceback (most recent call last):\n  File \"task.py\", line 9, in datasets\n"
               "FileNotFoundError: [Errno 2] No such file or directory: 'data/train.txt'\n"
               "Traceback (most recent call last):\n  File \"run.py\", line 1142, in <module>\n"
               "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
               "=======================================================\n")
    assert first_error(console) == "FileNotFoundError: [Errno 2] No such file or directory: 'data/train.txt'"
    assert first_error("error: data.root: no such folder\n" + console) == "error: data.root: no such folder"
    assert first_error("Signal 6 (SIGABRT) received by PID 11547\n=====\n") == ""
