"""Several processes through the real launcher (CPU, gloo): exact metrics and per-rank data."""

import json
import os
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import Shared
from helpers import (CPU, LENET, PROBE, REPO, accelerate_launch, free_port, launch, launch_two, ok, only_run, start,
                     summary)
from toolkit.distributed import first_line

# Here 2 processes start with the flags form (`launch_two(..., flags=True)`); the other test files
# use accelerate_configs/multi_gpu.yaml.


@pytest.fixture(scope="module")
def one_process_eval(mnist_root, tmp_path_factory):
    """LeNet with lr=0 on 1 process: its val and test metrics are those of the initial weights,
    which every launch path must reproduce."""
    return Shared(tmp_path_factory, "one", [LENET, f"data.root={mnist_root}", "data.val_size=1001",
                                            "data.download=false", "epochs=1", "optim.lr=0", "eval_batch_size=100",
                                            "trackers=[]"], env=CPU)  # on the CPU, as the others


def same_evaluation(result, expected):
    for split in ("val", "test"):
        assert result[split]["samples"] == expected[split]["samples"] == 1001
        assert result[split]["accuracy"] == expected[split]["accuracy"]
        assert result[split]["loss"] == pytest.approx(expected[split]["loss"], rel=1e-6)


def test_two_processes_count_every_evaluation_sample_once(one_process_eval, tmp_path):
    """Val and test have 1001 samples, in batches of 100 that split 6/5 over two ranks: a
    2-process run reports the same counts and accuracy as 1 process on the same weights (lr=0)."""
    ok(launch_two([*one_process_eval.args, f"output_dir={tmp_path}"], cwd=tmp_path, flags=True))
    one, two = summary(one_process_eval.run), summary(only_run(tmp_path))  # one run folder, also with two processes
    same_evaluation(two, one)
    assert two["steps"] == one["steps"] // 2 + one["steps"] % 2  # each rank half


def read_probe(path, processes):
    return [[json.loads(line) for line in open(f"{path}.rank{rank}")] for rank in range(processes)]


def test_each_rank_gets_its_own_data_and_randomness_reproducibly(probe_run, tmp_path):
    """`probe_run` (2 processes, seed 0) is run "a"; this test runs it again ("b", its model warning
    as a library would), on 1 process ("one") and with seed 1 ("seed1")."""
    probes = {"a": read_probe(probe_run.probe, 2)}
    for name, processes, seed in (("b", 2, 0), ("one", 1, 0), ("seed1", 2, 1)):
        args = [*probe_run.args, f"probe={tmp_path / name}", f"seed={seed}", f"output_dir={tmp_path / 'runs'}",
                f"warn={name == 'b'}"]
        result = ok(launch_two(args, cwd=tmp_path, flags=True) if processes == 2 else launch(args, cwd=tmp_path))
        probes[name] = read_probe(tmp_path / name, processes)
        if name == "b":  # a library's warning, shown by the main process alone
            assert result.stderr.count("FutureWarning: probe.model: this argument is deprecated") == 1, result.stderr

    rank0, rank1 = probes["a"]
    assert len(rank0) == len(rank1) == 2 * 8  # 256 samples / (16 x 2 ranks) = 8 steps per epoch
    for epoch in (0, 1):
        seen = [sum((step["index"] for step in rank[epoch * 8:(epoch + 1) * 8]), []) for rank in (rank0, rank1)]
        assert not set(seen[0]) & set(seen[1])                 # different data on each rank ...
        assert sorted(seen[0] + seen[1]) == list(range(256))   # ... and every sample once per epoch
    assert rank0[0]["index"] != rank0[8]["index"]               # reshuffled each epoch
    assert rank0[0]["noise"] != rank1[0]["noise"]               # different augmentation per rank
    # HF datasets, a second's import (pandas too), is not imported where the recipe does not use it.
    assert not any(step["datasets_imported"] for step in rank0 + rank1)

    assert probes["b"] == probes["a"]                           # reproducible for a fixed seed
    assert probes["seed1"][0][0]["index"] != rank0[0]["index"]  # and the seed matters
    # The data order depends on the seed only: two ranks interleave one process's batches.
    # So does the augmentation, drawn per batch: the same samples get the same draws.
    (single,) = probes["one"]
    for key in ("index", "noise"):
        assert [s[key] for s in single[:16]] == [r[i][key] for i in range(8) for r in (rank0, rank1)]


def test_torchrun_without_accelerate_launch(one_process_eval, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", free_port()]
    ok(launch([*one_process_eval.args, f"output_dir={tmp_path}"], cwd=tmp_path, launcher=torchrun, timeout=300))
    log = (only_run(tmp_path) / "log.txt").read_text()
    assert "strategy: DDP, 2 processes (parameters copied) on cpu" in log  # gloo, no env needed
    same_evaluation(summary(only_run(tmp_path)), summary(one_process_eval.run))


def two_machines(args, tmp_path, processes_per_machine, cwds=None, succeed=True):
    """Two `accelerate launch` commands with machine ranks 0 and 1, meeting on 127.0.0.1, each
    in its own working folder (`cwds`; default: both in tmp_path); each must succeed, or fail."""
    port = free_port()
    launchers = [accelerate_launch("--config_file", REPO / "accelerate_configs" / "multi_node.yaml",
                                   "--num_processes", 2 * processes_per_machine, "--machine_rank", rank,
                                   "--main_process_ip", "127.0.0.1", "--main_process_port", port) for rank in (0, 1)]
    machines = [start(args, cwd=cwd, launcher=launcher, env=CPU)
                for launcher, cwd in zip(launchers, cwds or [tmp_path] * 2)]
    outputs = [m.communicate(timeout=300) for m in machines]
    for machine, (out, err) in zip(machines, outputs):
        assert (machine.returncode == 0) == succeed, err[-3000:]
    return outputs


def test_two_machines_of_two_processes_count_every_sample_once(one_process_eval, tmp_path):
    outputs = two_machines([*one_process_eval.args, f"output_dir={tmp_path}"], tmp_path, processes_per_machine=2)
    run = only_run(tmp_path)  # one run folder for both machines
    assert "strategy: DDP, 4 processes (parameters copied) on cpu" in (run / "log.txt").read_text()
    same_evaluation(summary(run), summary(one_process_eval.run))
    assert [out.count("test accuracy=") for out, _ in outputs] == [1, 0]  # printed once, by the main process


def test_two_machines_train_as_one_machine_with_the_same_world_size(tiny, tmp_path):
    common = [LENET, *tiny, "epochs=2", "trackers=[]"]
    two_machines([*common, f"output_dir={tmp_path / 'machines'}"], tmp_path, processes_per_machine=1)
    ok(launch_two([*common, f"output_dir={tmp_path / 'one'}"], cwd=tmp_path, flags=True))
    machines, one = only_run(tmp_path / "machines"), only_run(tmp_path / "one")
    assert summary(machines)["test"] == summary(one)["test"]
    a = load_file(machines / "checkpoints" / "latest" / "model.safetensors")
    b = load_file(one / "checkpoints" / "latest" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_machines_that_do_not_share_the_output_dir_stop_at_once(tiny, tmp_path):
    """Each machine in its own folder with a relative output_dir: the second does not see the run
    folder that the first made, so checkpoints could not be written; both say so and stop."""
    cwds = [tmp_path / "machine0", tmp_path / "machine1"]
    for cwd in cwds:
        cwd.mkdir()
    outputs = two_machines([LENET, *tiny, "output_dir=runs"], tmp_path, 1, cwds=cwds, succeed=False)
    for _, err in outputs:  # said once on each machine, before the launcher's own report
        assert err.startswith("error: output_dir=runs is not shared storage: the run folder runs/lenet/"), err
        assert err.count("error: ") == 1, err
    assert [list(cwd.glob("runs/*/*")) for cwd in cwds] == [[], []]  # no run folder left behind


def test_an_error_on_one_rank_ends_every_process_quickly(tmp_path):
    args = [PROBE, "batch_size=8", "epochs=2", "trackers=[]", "fail_rank=1", "fail_step=3", f"output_dir={tmp_path}"]
    started = time.monotonic()
    result = launch_two(args, cwd=tmp_path, timeout=60, flags=True, fresh=True)
    assert result.returncode != 0 and time.monotonic() - started < 60
    original = [line for line in result.stderr.splitlines() if "ValueError: sample" in line and "error: " not in line]
    assert len(original) == 1  # the original error, once (the relayed line below names it too)
    assert "error: rank 0 stopped: another process failed (rank 1: ValueError: sample" in result.stderr
    assert "Connection closed by peer" not in result.stderr  # no second traceback from rank 0
    final = summary(only_run(tmp_path))
    assert final["status"] == "failed" and final["error"].startswith("another process failed: rank 1: ValueError")


def test_accelerate_launch_cpu_with_several_processes_is_refused(tiny, tmp_path):
    launcher = accelerate_launch("--cpu", "--num_processes", "2", "--main_process_port", free_port())
    result = launch([LENET, *tiny], cwd=tmp_path, launcher=launcher, timeout=120)
    assert result.returncode != 0
    assert "error: accelerate launch was asked for several CPU processes but started only this one" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_the_process_group_waits_longer_than_the_watchdog(probe_run):
    """A collective that waits for a hung process fails after the group's timeout: 5 minutes past
    watchdog_minutes (30 by default), so that the watchdog says first where each rank was."""
    for rank in read_probe(probe_run.probe, 2):
        assert {step["group_timeout_s"] for step in rank} == {35 * 60}


def test_a_parameter_without_a_gradient_names_the_ddp_key(probe_run, tmp_path):
    """DDP's reducer error (a parameter that no loss used) ends the run in one line naming
    ddp.find_unused_parameters, with which the same run trains (`probe_run`)."""
    assert "unused=true" in probe_run.args and summary(probe_run.run)["status"] == "finished"
    args = [*probe_run.args, "ddp.find_unused_parameters=false", "max_steps=2", f"output_dir={tmp_path / 'runs'}"]
    result = launch_two(args, cwd=tmp_path, timeout=120, flags=True, fresh=True)
    assert result.returncode != 0 and "Expected to have finished reduction" not in result.stderr  # not its traceback
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "set ddp.find_unused_parameters=true" in errors[0]
    assert "ddp.find_unused_parameters" in summary(only_run(tmp_path / "runs"))["error"]


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_strategy_that_accelerate_would_drop_is_refused(tiny, tmp_path, flag):
    """FSDP or DeepSpeed asked for with ACCELERATE_USE_CPU=1 (`--cpu`), with which Accelerate trains
    DDP instead, silently: the run stops in one line before anything is written. (Without it, the
    same configs train on CPU processes: test_strategies.py.)"""
    result = launch([LENET, *tiny], cwd=tmp_path, env={flag: "true", "ACCELERATE_USE_CPU": "1"})
    strategy = "FSDP" if flag == "ACCELERATE_USE_FSDP" else "DeepSpeed"
    assert result.returncode != 0 and f"Accelerate drops {strategy} and trains DDP" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_fsdp_s_own_activation_checkpointing_is_refused_for_the_key(tiny, tmp_path):
    """fsdp_activation_checkpointing (Accelerate's, which recomputes with new dropout masks) is
    refused in one line that names the key that keeps them, before anything is written."""
    result = launch([LENET, *tiny], cwd=tmp_path, env={"ACCELERATE_USE_FSDP": "true",
                                                       "FSDP_ACTIVATION_CHECKPOINTING": "true"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1 and "use activation_checkpointing=true" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_tensor_parallel_is_refused_in_one_line(tiny, tmp_path):
    """accelerate launch --parallelism_config_tp_size 2 sets these variables: refused before anything is written."""
    result = launch([LENET, *tiny], cwd=tmp_path, env={"ACCELERATE_USE_PARALLELISM_CONFIG": "true",
                                                       "PARALLELISM_CONFIG_TP_SIZE": "2"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1
    assert "tensor parallel (parallelism_config_tp_size: 2)" in errors[0]
    assert not (tmp_path / "runs").exists()


class FailsInAWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise ValueError("No samples found in dataset; perhaps you have fewer shards than workers.\n"
                         "Turn off using empty_check=False in the WebDataset constructor.")
        yield


def test_an_error_relayed_from_a_dataloader_worker_names_its_exception_and_first_line():
    with pytest.raises(ValueError) as raised:
        list(torch.utils.data.DataLoader(FailsInAWorker(), num_workers=1))
    assert first_line(raised.value) == "ValueError: No samples found in dataset; perhaps you have fewer shards " \
                                       "than workers."
    assert first_line(KeyError("x")) == "KeyError: 'x'"


SIZED = '''
import os
from pathlib import Path

import torch
import torch.nn.functional as F

config = {"trackers": [], "epochs": 1, "checkpoint": {"monitor": ""}}


def datasets(cfg):  # a length that differs by process, or that a file sets: data that is not the same
    n = int(Path("n.txt").read_text()) if Path("n.txt").exists() else 64 + int(os.environ.get("RANK", 0))
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return {"train": torch.utils.data.TensorDataset(x, 2 * x)}


def model(cfg):
    return torch.nn.Linear(1, 1)


def loss(model, batch, cfg):
    x, y = batch
    return F.mse_loss(model(x), y), {"samples": len(x)}
'''


def test_datasets_that_differ_between_processes_are_refused_before_training(tmp_path):
    (tmp_path / "sized.py").write_text(SIZED)
    result = launch_two([tmp_path / "sized.py", f"output_dir={tmp_path}"], cwd=tmp_path, timeout=120, fresh=True)
    assert result.returncode != 0
    assert "error: the recipe's datasets() gave the processes different data: split lengths rank 0: {'train': 64}; " \
           "rank 1: {'train': 65}" in result.stderr


def test_a_datasets_that_coordinates_its_processes_runs_on_all_at_once_with_datasets_together(tmp_path):
    """datasets() with a torch.distributed barrier (MosaicML's StreamingDataset calls three): run on
    the main process first, it is refused in one line that names datasets_together; with it, every
    process runs datasets() at once, and the run trains and tests each sample once."""
    args = [REPO / "tests" / "recipes" / "coordinated.py", f"data_dir={tmp_path}", f"output_dir={tmp_path / 'runs'}"]
    refused = launch_two(args, cwd=tmp_path, timeout=120, fresh=True)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode != 0 and len(errors) == 1, refused.stderr[-2000:]
    assert "calls torch.distributed.barrier while the main process runs it alone" in errors[0]
    assert "needs datasets_together=true" in errors[0]
    ok(launch_two([*args, "datasets_together=true"], cwd=tmp_path, timeout=120))
    run = only_run(tmp_path / "runs")
    assert summary(run)["status"] == "finished" and summary(run)["test"]["samples"] == 50


def test_a_resume_on_other_data_is_refused(tmp_path):
    (tmp_path / "sized.py").write_text(SIZED)
    (tmp_path / "n.txt").write_text("64")
    ok(launch([tmp_path / "sized.py", f"output_dir={tmp_path}"], cwd=tmp_path))
    (tmp_path / "n.txt").write_text("50")
    result = launch(["resume", only_run(tmp_path), "epochs=2"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == (
        "error: the recipe's datasets() now gives split lengths {'train': 50}, but the run trained on {'train': 64}: "
        "a resumed run needs the data it started with\n")


def _stop_requests(rank, store, results):
    """One of two gloo processes: asks StopRequest at 4 steps, its clock past max_minutes from step 1 on
    rank 0 but only from step 3 on rank 1."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from toolkit.run.signals import StopRequest

    with StopRequest(2) as stop:
        results[rank] = [str(stop.check(over_time=step >= 1 + 2 * rank)) for step in range(4)]
    torch.distributed.destroy_process_group()


def test_ranks_whose_clocks_disagree_stop_at_one_step_for_one_reason(tmp_path):
    """max_minutes reaches the ranks at different steps: they stop at the same step, and both for
    max_minutes, so that both validate before they stop (a rank that heard only "another rank's
    clock" and skipped the validation would leave the other waiting in its collectives)."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.Manager().dict()
    processes = [context.Process(target=_stop_requests, args=(rank, tmp_path / "store", results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    # Agreed one step after it was asked for (the all-reduce is read at the next step).
    assert results[0] == results[1] == ["None", "None", "max_minutes", "max_minutes"]


def _threads_after_the_group(rank, port, results):
    """One of two gloo processes: it starts the process group as a run does, imports torch._dynamo
    after it, as accelerator.prepare does, ends a collective and the group; its threads then."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="1")
    from toolkit import config
    from toolkit.distributed import start_processes

    assert "torch._dynamo" not in sys.modules
    before = len(os.listdir("/proc/self/task"))
    processes, _ = start_processes(config.resolve({}))
    import torch._dynamo  # noqa: F401

    processes.wait_for_everyone()
    processes.destroy_process_group()
    results[rank] = (before, len(os.listdir("/proc/self/task")))


def test_the_process_group_ends_with_its_threads(tmp_path):
    """torch._dynamo, imported after the group starts, must not keep it alive past
    destroy_process_group: gloo's threads, still finishing the last collective as the interpreter
    exits, would abort the process ("terminate called without an active exception"), now and then."""
    context = torch.multiprocessing.get_context("spawn")
    results, port = context.Manager().dict(), free_port()
    processes = [context.Process(target=_threads_after_the_group, args=(rank, port, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    assert [after for before, after in results.values()] == [before for before, after in results.values()]


def test_a_rank_that_hangs_ends_the_run_with_every_rank_s_stacks(tmp_path):
    """Rank 1's loss blocks from its third step on, and rank 0 waits for it in the gradients'
    all-reduce. With watchdog_minutes=0.15 (9 s), both write the stacks of their threads, the summary
    says hung, after which step and which ranks reported, and the run ends with a non-zero status
    instead of waiting for the process group's timeout (30 minutes on gloo)."""
    line = REPO / "tests" / "recipes" / "line.py"
    result = launch_two([line, "hang_rank=1", "watchdog_minutes=0.15", "epochs=1", f"output_dir={tmp_path / 'runs'}"],
                        cwd=tmp_path, timeout=240, fresh=True)
    assert result.returncode != 0
    run = only_run(tmp_path / "runs")
    final = summary(run)
    assert final["status"] == "hung" and final["steps"] == 2
    assert f"after step 2; the stacks of ranks 0, 1 are in {run}/hang-rank<r>.txt" in final["error"]
    hung = (run / "hang-rank1.txt").read_text()
    assert "line.py" in hung and "in loss" in hung  # where rank 1 blocks
    assert "in _fire" in (run / "hang-rank0.txt").read_text()  # every thread of rank 0, the watchdog's too
    assert "error: rank 1 hung: no progress for 0.15 minutes after step 2" in result.stderr
