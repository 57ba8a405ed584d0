"""Several processes through the real launcher (CPU, gloo): exact metrics and per-rank data."""

import json

import pytest

from helpers import LENET, REPO, accelerate_launch, free_port, launch, only_run, summary

PROBE = REPO / "tests" / "recipes" / "probe.py"


def two_processes():
    return accelerate_launch("--config_file", REPO / "accelerate_configs" / "multi_gpu.yaml",
                             "--num_processes", "2", "--main_process_port", free_port())


def run(args, tmp_path, processes):
    launcher = two_processes() if processes == 2 else ()
    result = launch(args, cwd=tmp_path, launcher=launcher, env={"ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_count_every_evaluation_sample_once(tiny, tmp_path):
    """Val and test have 1001 samples, in batches of 100 that split 6/5 over two ranks: a
    2-process run reports the same counts and accuracy as 1 process on the same weights (lr=0)."""
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        run([LENET, *tiny, f"output_dir={out}", "epochs=1", "optim.lr=0", "eval_batch_size=100"],
            tmp_path, processes)
        results[processes] = summary(only_run(out))  # one run folder, also with two processes
    for split in ("val", "test"):
        one, two = results[1][split], results[2][split]
        assert one["samples"] == two["samples"] == 1001
        assert one["accuracy"] == two["accuracy"]
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)
    assert results[2]["steps"] == results[1]["steps"] // 2 + results[1]["steps"] % 2  # each rank half


def read_probe(path, processes):
    return [[json.loads(line) for line in open(f"{path}.rank{rank}")] for rank in range(processes)]


def test_each_rank_gets_its_own_data_and_randomness_reproducibly(tmp_path):
    common = ["batch_size=16", "epochs=2", "trackers=[]", f"output_dir={tmp_path / 'runs'}"]
    probes = {}
    for name, processes, seed in (("a", 2, 0), ("b", 2, 0), ("one", 1, 0), ("seed1", 2, 1)):
        run([PROBE, *common, f"probe={tmp_path / name}", f"seed={seed}"], tmp_path, processes)
        probes[name] = read_probe(tmp_path / name, processes)

    rank0, rank1 = probes["a"]
    assert len(rank0) == len(rank1) == 2 * 8  # 256 samples / (16 x 2 ranks) = 8 steps per epoch
    for epoch in (0, 1):
        seen = [sum((step["index"] for step in rank[epoch * 8:(epoch + 1) * 8]), []) for rank in (rank0, rank1)]
        assert not set(seen[0]) & set(seen[1])                 # different data on each rank ...
        assert sorted(seen[0] + seen[1]) == list(range(256))   # ... and every sample once per epoch
    assert rank0[0]["index"] != rank0[8]["index"]               # reshuffled each epoch
    assert rank0[0]["noise"] != rank1[0]["noise"]               # different augmentation per rank

    assert probes["b"] == probes["a"]                           # reproducible for a fixed seed
    assert probes["seed1"][0][0]["index"] != rank0[0]["index"]  # and the seed matters
    # The data order depends on the seed only: two ranks interleave one process's batches.
    # So does the augmentation, drawn per batch: the same samples get the same draws.
    (single,) = probes["one"]
    for key in ("index", "noise"):
        assert [s[key] for s in single[:16]] == [r[i][key] for i in range(8) for r in (rank0, rank1)]
