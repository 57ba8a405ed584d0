"""Training features configured, not coded: accumulation, precision, clipping, the non-finite
guard, optimizers, schedules, EMA, validation cadence, budgets, early stopping, debug modes."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate.tracking import GeneralTracker
from safetensors.torch import load_file

import launch as launch_module
from helpers import (FASHION_MNIST, LENET, PROBE, REPO, assert_same_weights, copy_run, launch, launch_two, ok, only_run,
                     read_jsonl, records, summary)
from toolkit import UserError, build, config, optim, recipe
from toolkit.data.loaders import make_loader
from toolkit.optim import lr_schedule, make_optimizer
from toolkit.run import trackers
from toolkit.state import checkpoint


def lenet_cfg(*overrides):
    return config.resolve(recipe.load(LENET).config, [], overrides)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation, precision, clipping

def test_accumulation_matches_the_larger_batch(tiny, tmp_path):
    """Batch 16 x 4 micro-batches and batch 64 take the same optimizer steps, with the same LR
    schedule, the same losses (averaged over the effective batch) and nearly the same weights."""
    common = [LENET, *tiny, "data.val_size=1080", "epochs=2", "log_every=3", "sched.name=cosine",
              "sched.warmup_steps=5", "optim.lr=3e-3"]  # 1920 training samples: 30 batches of 64
    ok(launch([*common, "batch_size=16", "grad_accum=4", f"output_dir={tmp_path / 'accum'}"], cwd=tmp_path))
    ok(launch([*common, "batch_size=64", f"output_dir={tmp_path / 'big'}"], cwd=tmp_path))
    accum, big = only_run(tmp_path / "accum"), only_run(tmp_path / "big")
    a, b = records(accum, "train"), records(big, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] and a[-1]["step"] == 60
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["samples"] for r in a] == [r["samples"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-3)
    wa = load_file(checkpoint.find(accum) / "model.safetensors")
    wb = load_file(checkpoint.find(big) / "model.safetensors")
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-4), key


def test_fp16_on_cpu_is_refused(tiny, tmp_path, capsys):
    code = launch_module.main([LENET, *tiny, "precision=fp16"])
    assert code == 2
    assert capsys.readouterr().err == ("error: precision=fp16 needs a GPU (on the CPU it would silently train in "
                                       "fp32); use precision=bf16 or precision=no\n")
    assert not (tmp_path / "runs").exists()


def test_bf16_on_cpu_trains(tiny, tmp_path):
    ok(launch([LENET, *tiny, "precision=bf16", "epochs=2"], cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    assert "precision bf16" in (run / "log.txt").read_text()
    assert summary(run)["test"]["accuracy"] > 0.9


def parameter_change(run, a, b):
    wa = load_file(checkpoint.find(run, a) / "model.safetensors")
    wb = load_file(checkpoint.find(run, b) / "model.safetensors")
    return math.sqrt(sum(((wa[k] - wb[k]) ** 2).sum().item() for k in wa))


@pytest.mark.parametrize("clip", [0.0, 0.01])
def test_clipping_bounds_the_update_and_the_norm_is_logged(tiny, tmp_path, clip):
    """With plain SGD (lr 1) one step moves the weights by exactly the clipped gradient norm."""
    ok(launch([LENET, *tiny, "optim.name=sgd", "optim.momentum=0", "optim.lr=1", "max_steps=2", "skip_nonfinite=true",
               "checkpoint.every_steps=1", f"clip_grad_norm={clip}", "log_every=1", "checkpoint.monitor="],
              cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    moved = parameter_change(run, "step-0000001", "step-0000002")
    norm = records(run, "train")[1]["grad_norm"]  # the norm before clipping, logged either way
    assert norm > 0.05
    assert moved == pytest.approx(min(norm, clip) if clip else norm, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Non-finite steps

def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    args = [PROBE, "batch_size=8", "epochs=1", "log_every=4", "trackers=[]", "checkpoint.monitor=",
            "skip_nonfinite=true", "nan_rank=1", "nan_steps=[3, 4]", f"output_dir={tmp_path}"]
    result = ok(launch_two(args, cwd=tmp_path, timeout=180))
    run = only_run(tmp_path)
    train = records(run, "train")
    assert [r["skipped_steps"] for r in train][:2] == [2, 0]
    assert summary(run)["status"] == "finished" and summary(run)["steps"] == 16
    assert all(torch.isfinite(w).all() for w in load_file(run / "checkpoints" / "latest" / "model.safetensors").values())
    assert "step 3: non-finite loss or gradient norm; step skipped (1 in a row" in result.stderr


def test_too_many_non_finite_steps_stop_the_run_with_the_last_good_state(tmp_path):
    args = [PROBE, "batch_size=8", "epochs=3", "log_every=4", "trackers=[]", "checkpoint.monitor=",
            "checkpoint.every_steps=2", "skip_nonfinite=true", "nan_rank=1", f"nan_steps={list(range(5, 40))}",
            "nan_tolerance=3",
            f"output_dir={tmp_path}"]
    result = launch_two(args, cwd=tmp_path, timeout=180, fresh=True)
    assert result.returncode != 0
    run = only_run(tmp_path)
    final = summary(run)
    assert final["status"] == "failed" and final["steps"] == 8  # steps 5, 6, 7, 8 skipped: more than 3
    assert "4 optimizer steps in a row had a non-finite loss or gradient norm" in final["error"]
    assert f"error: {final['error']}" in result.stderr
    closing = (run / "log.txt").read_text().splitlines()[-1].split(" ", 2)[2]  # after the date and time
    assert closing.startswith(f"failed at epoch 0 step 8 ({final['error']}) | ")
    last = checkpoint.find(run)
    assert checkpoint.read_state(last).step == 8
    saved, good = load_file(last / "model.safetensors"), load_file(run / "checkpoints" / "step-0000004" /
                                                                    "model.safetensors")
    for key in saved:  # the skipped steps changed nothing
        assert torch.equal(saved[key], good[key])


# ---------------------------------------------------------------------------------------------
# Optimizer, parameter groups, schedules

def test_parameter_groups_decay_multipliers_and_freezing():
    cfg = lenet_cfg("optim.lr=1e-3", "optim.weight_decay=0.1", "optim.lr_mult.features=0.1", "freeze=[classifier.5]")
    model = recipe.load(LENET).model(cfg)
    optimizer, lines = make_optimizer(cfg, model, recipe.load(LENET))
    groups = {(round(g["lr"], 8), g["weight_decay"]): g["params"] for g in optimizer.param_groups}
    named = {id(p): n for n, p in model.named_parameters()}
    names = {key: sorted(named[id(p)] for p in ps) for key, ps in groups.items()}
    assert names == {
        (1e-4, 0.1): ["features.0.weight", "features.3.weight"],
        (1e-4, 0.0): ["features.0.bias", "features.3.bias"],
        (1e-3, 0.1): ["classifier.1.weight", "classifier.3.weight"],
        (1e-3, 0.0): ["classifier.1.bias", "classifier.3.bias"],
    }
    assert not model.classifier[5].weight.requires_grad
    assert lines[-1] == "frozen: 2 tensors, 850 parameters"
    assert optimizer.defaults["betas"] == (0.9, 0.999)


def test_unknown_module_prefixes_are_named():
    cfg = lenet_cfg("freeze=[backbone]")
    with pytest.raises(UserError, match="no parameter of the model starts with 'backbone'.*features, classifier"):
        make_optimizer(cfg, recipe.load(LENET).model(cfg), recipe.load(LENET))


@pytest.mark.parametrize("name, values", [
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0}),
    ("cosine", {10: 1.0, 55: 0.55, 100: 0.1}),
    ("linear", {10: 1.0, 55: 0.55, 100: 0.1}),
    ("step", {10: 1.0, 19: 1.0, 20: 0.1, 40: 0.01}),
    ("onecycle", {0: 0.04, 10: 1.0, 100: 0.0}),
])
def test_lr_schedules(name, values):
    cfg = lenet_cfg(f"sched.name={name}", "sched.warmup_steps=10", "sched.min_lr=0.1", "epochs=5",
                    "sched.step_epochs=1")
    factor = lr_schedule(cfg, steps_per_epoch=20)
    for step, expected in values.items():
        assert factor(step) == pytest.approx(expected, abs=1e-9), step


def test_onecycle_warms_up_for_30_percent_by_default():
    factor = lr_schedule(lenet_cfg("sched.name=onecycle", "sched.warmup_epochs=0", "epochs=1"), steps_per_epoch=100)
    assert factor(29) < factor(30) == 1.0 > factor(31)


class Lines(GeneralTracker):
    """A tracker that writes each logged step into <run>/lines.jsonl (for the registry test)."""
    name, requires_logging_directory = "lines", False

    def __init__(self, run_dir):
        super().__init__()
        self.file = open(run_dir / "lines.jsonl", "a")

    @property
    def tracker(self):
        return self.file

    def log(self, values, step=None, **kwargs):
        self.file.write(json.dumps({"step": step, **values}) + "\n")

    def finish(self):
        self.file.close()


def test_a_new_optimizer_schedule_and_tracker_are_one_entry_each(tiny, tmp_path, monkeypatch):
    """One entry in toolkit.optim's OPTIMIZERS and SCHEDULES and in toolkit.run.trackers's TRACKERS, and a
    run takes optim.name=adagrad sched.name=halving trackers=[lines]: the config accepts the names,
    the optimizer is Adagrad, the LR halves every 4 steps, and the tracker logs every step."""
    monkeypatch.setitem(optim.OPTIMIZERS, "adagrad", lambda groups, o: torch.optim.Adagrad(groups, lr=o.lr))
    halving = optim.Schedule(lambda step, progress, s, per_epoch: 0.5 ** (step // 4))
    monkeypatch.setitem(optim.SCHEDULES, "halving", halving)
    monkeypatch.setitem(trackers.TRACKERS, "lines", trackers.Tracker(lambda cfg, run_dir, state: Lines(run_dir)))
    ok(launch([LENET, *tiny, "optim.name=adagrad", "sched.name=halving", "trackers=[lines]", "max_steps=10",
               "log_every=1"], cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    assert "optimizer adagrad: group 0: lr 0.001" in (run / "log.txt").read_text()
    lines = [r for r in read_jsonl(run / "lines.jsonl") if "train/lr" in r]
    assert [r["step"] for r in lines] == list(range(1, 11))
    assert [r["train/lr"] for r in lines] == [1e-3 * 0.5 ** ((step - 1) // 4) for step in range(1, 11)]


def test_lr_trace_is_the_same_with_two_processes(tmp_path):
    """2 processes x batch 8 take the steps 1 process x batch 16 takes: the LR is stepped once per
    optimizer step, not once per process."""
    common = [PROBE, "epochs=2", "log_every=1", "trackers=[]", "checkpoint.monitor=", "sched.name=cosine",
              "sched.warmup_epochs=0.5"]
    ok(launch([*common, "batch_size=16", f"output_dir={tmp_path / 'one'}"], cwd=tmp_path))
    ok(launch_two([*common, "batch_size=8", f"output_dir={tmp_path / 'two'}"], cwd=tmp_path))
    one, two = records(only_run(tmp_path / "one"), "train"), records(only_run(tmp_path / "two"), "train")
    assert len(one) == 32 and [r["lr"] for r in one] == [r["lr"] for r in two]
    assert one[0]["lr"] == 0.0 and one[8]["lr"] == pytest.approx(1e-3) and one[-1]["lr"] < 1e-5  # warmup, cosine


# ---------------------------------------------------------------------------------------------
# What a train window shows besides the loss: data wait and memory

def test_data_wait_is_the_share_of_a_window_spent_waiting_for_batches(tmp_path):
    """The same run, once with batches that take 50 ms to fetch and once with steps that take 50 ms:
    the first waits for its data most of each window, the second far less. Every window also says
    the process's memory (on a CPU, its resident set)."""
    line = str(REPO / "tests" / "recipes" / "line.py")
    waits = {}
    for slow in ("fetch_seconds", "step_seconds"):
        ok(launch([line, f"{slow}=0.05", "epochs=1", "log_every=4", "val_every=0", f"output_dir={tmp_path / slow}"],
                  cwd=tmp_path))
        windows = records(only_run(tmp_path / slow), "train")
        assert not (only_run(tmp_path / slow) / "profile").exists()  # profile.active=0: no profiler
        assert all(0 <= w["data_wait"] <= 1 and 0.01 < w["rss_gb"] < 1000 for w in windows)
        waits[slow] = min(w["data_wait"] for w in windows), max(w["data_wait"] for w in windows)
    assert waits["fetch_seconds"][0] > 0.5 > waits["step_seconds"][1]


def test_the_profiler_records_its_window_of_steps_into_the_run_folder(tiny, tmp_path):
    """profile.wait=2 profile.warmup=1 profile.active=2: steps 4 and 5 are traced into <run>/profile/ as
    Chrome trace JSON (what TensorBoard's profiler and Perfetto open), with the model's operators,
    and log.txt gets the ten most expensive ones."""
    ok(launch([LENET, *tiny, "max_steps=8", "profile.wait=2", "profile.warmup=1", "profile.active=2"], cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    (trace,) = (run / "profile").glob("rank0*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"ProfilerStep#3", "ProfilerStep#4"} <= names and "ProfilerStep#2" not in names  # 0-based: steps 4, 5
    assert {"aten::convolution", "aten::addmm"} <= names  # LeNet's convolutions and linear layers
    log = (run / "log.txt").read_text()
    table = log[log.index("the 10 most expensive operators:"):]
    assert "Self CPU" in table and "aten::" in table


# ---------------------------------------------------------------------------------------------
# EMA

def test_ema_is_validated_monitored_saved_and_tested(ema_run, tmp_path):
    """`ema_run` kept an EMA of the weights (decay 0.9) and monitored it. (That it resumes bitwise
    is checked in test_checkpoint.py::test_resume_equals_the_unbroken_run, on the same run.)"""
    run = copy_run(ema_run.run, tmp_path)  # `test` writes its results into the run folder
    assert len(records(run, "val_ema")) == 3 and summary(run)["best"]["monitor"] == "val_ema/accuracy"
    ema = load_file(checkpoint.find(run) / "ema.safetensors")
    raw = load_file(checkpoint.find(run) / "model.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # an average, not a copy
    assert (run / "model_ema.safetensors").is_file()

    out = ok(launch(["test", run, "--ema", "--checkpoint", "latest", "--split", "val"], cwd=tmp_path)).stdout
    assert out.startswith(f"val_ema accuracy={summary(run)['val_ema']['accuracy']:.6g} ")


# ---------------------------------------------------------------------------------------------
# Budgets, early stopping (the validation and save cadence: test_loop.py)

def test_max_minutes_stops_on_time(tiny, tmp_path):
    ok(launch([LENET, *tiny, "epochs=50", "max_minutes=0.0001"], cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    final = summary(run)
    assert final["status"] == "finished" and final["steps"] < 50 * 32 and "test" in final
    assert f"stopped at step {final['steps']}: max_minutes" in (run / "log.txt").read_text()


def test_early_stopping_stops_every_rank_together(tiny, tmp_path):
    """lr=0: the monitor never improves after the first validation, so patience 2 ends at epoch 3."""
    ok(launch_two([LENET, *tiny, "epochs=10", "optim.lr=0", "early_stop.patience=2"], cwd=tmp_path, timeout=180))
    run = only_run(tmp_path / "runs")
    assert summary(run)["status"] == "finished" and summary(run)["epochs"] == 3
    assert "stopped at step 48: early_stop" in (run / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------
# Debug modes, seeding

@pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"no Fashion-MNIST in {FASHION_MNIST}: apt-get install dataset-fashion-mnist")
def test_overfit_batches_reaches_100_percent_with_the_recipe_defaults(tmp_path):
    """LeNet's own schedule (warmup, then cosine to zero) over one epoch of the 2 batches repeated."""
    ok(launch([LENET, "data.name=fashion_mnist", f"data.root={FASHION_MNIST}", "debug.overfit_batches=2", "epochs=1",
               "trackers=[]", f"output_dir={tmp_path}"], cwd=tmp_path))
    run = only_run(tmp_path)
    assert summary(run)["val"]["samples"] == 256  # validated on the same 2 batches of 128
    assert records(run, "train")[-1]["lr"] < 1e-6  # the schedule ran to its end
    assert records(run, "train")[-1]["accuracy"] == 1.0 and summary(run)["val"]["accuracy"] == 1.0


def test_compile_runs_the_model_through_torch_compile_and_keeps_its_weight_names(tiny, tmp_path):
    # TORCH_LOGS=graph_code prints each graph that torch.compile captures (read when torch starts);
    # TORCH_COMPILE_OVERRIDE_BACKENDS runs the graphs eagerly: the toolkit's part is the same, and
    # inductor's C++ compile of a cold cache (a minute here) is left out.
    # Evaluation in batches of the training's size: one shape, no recompiling for a second.
    dynamo = {"TORCH_LOGS": "graph_code", "TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:eager"}
    result = ok(launch([LENET, *tiny, "debug.fast_run=true", "compile=true", "eval_batch_size=64"], cwd=tmp_path,
                       env=dynamo, timeout=300, fresh=True))
    assert "GraphModule" in result.stderr
    run = only_run(tmp_path / "runs")
    saved = load_file(checkpoint.find(run) / "model.safetensors")
    assert set(saved) == set(recipe.load(LENET).model(None).state_dict())  # no "_orig_mod." prefixes
    ok(launch(["test", run], cwd=tmp_path, env=dynamo, fresh=True))  # loads the weights into a plain model, strictly


GPT = str(REPO / "recipes" / "gpt.py")
TINY_GPT = ["n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "data.max_bytes=30000", "trackers=[]"]


def saved_bytes(net, *inputs):
    """The bytes of the tensors that autograd keeps from a training forward of `net` for backward."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.nbytes) or t, lambda t: t):
        net(*inputs)
    return sum(kept)


def test_activation_checkpointing_keeps_less_and_gives_the_same_run_with_dropout(tmp_path):
    """The GPT's blocks recomputed in backward: the forward keeps under half the activations, and a
    run with dropout ends with the same losses and weights, bit for bit, as without."""
    gpt = recipe.load(GPT)
    cfg = config.resolve(gpt.config, [], [*TINY_GPT, "dropout=0.2"])
    net, inputs = gpt.model(cfg), torch.randint(0, 256, (4, 32))
    plain = saved_bytes(net, inputs)
    build.checkpoint_activations(net)
    assert saved_bytes(net, inputs) < plain / 2

    for on in ("false", "true"):
        ok(launch([GPT, *TINY_GPT, "dropout=0.2", "log_every=1", f"activation_checkpointing={on}",
                   f"output_dir={tmp_path / on}"], cwd=tmp_path))
    runs = {on: only_run(tmp_path / on) for on in ("false", "true")}
    assert [r["loss"] for r in records(runs["true"], "train")] == [r["loss"] for r in records(runs["false"], "train")]
    assert_same_weights(*(load_file(checkpoint.find(run) / "model.safetensors") for run in runs.values()))


def test_activation_checkpointing_updates_batchnorm_statistics_once(tmp_path):
    """A checkpointed block's BatchNorm updates its running statistics in forward only, not again
    in the recompute: after a step they, and the gradients, equal the plain model's."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU()),
                                torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    checkpointed = copy.deepcopy(plain)
    build.checkpoint_activations(checkpointed)
    x = torch.randn(16, 8)
    for net in (plain, checkpointed):
        torch.manual_seed(1)
        net(x).square().sum().backward()
    assert_same_weights(checkpointed.state_dict(), plain.state_dict())
    assert plain[0][1].num_batches_tracked == 1
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), checkpointed.parameters()))


def test_activation_checkpointing_uses_a_transformers_model_s_own_and_refuses_a_model_without_blocks():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    hf = torch.nn.ModuleDict({"lm": lm})
    build.checkpoint_activations(hf)
    lm = hf["lm"]  # transformers 5.x names it activation checkpointing
    assert getattr(lm, "is_activation_checkpointing", None) or lm.is_gradient_checkpointing
    with pytest.raises(UserError, match="activation_checkpointing=true found no blocks in Linear"):
        build.checkpoint_activations(torch.nn.Linear(2, 2))


def test_limit_batches(tiny, tmp_path):
    ok(launch([LENET, *tiny, "epochs=2", "limit_batches.train=3", "limit_batches.val=2", "eval_batch_size=100"],
              cwd=tmp_path))
    final = summary(only_run(tmp_path / "runs"))
    assert final["steps"] == 6 and final["val"]["samples"] == 200 and final["test"]["samples"] == 1001


def test_deterministic_runs_repeat(tiny, probe_run, tmp_path):
    for name in ("a", "b"):
        ok(launch([LENET, *tiny, "epochs=1", "deterministic=true", f"output_dir={tmp_path / name}"], cwd=tmp_path))
    assert summary(only_run(tmp_path / "a"))["test"] == summary(only_run(tmp_path / "b"))["test"]
    # The training step runs with torch's deterministic algorithms on, and only when asked.
    probe = tmp_path / "probe"
    ok(launch([PROBE, "epochs=1", "trackers=[]", "checkpoint.monitor=", "deterministic=true", f"probe={probe}",
               f"output_dir={tmp_path / 'probes'}"], cwd=tmp_path))
    assert {r["deterministic"] for r in read_jsonl(f"{probe}.rank0")} == {True}
    assert "deterministic=" not in " ".join(probe_run.args)  # the default: off
    for rank in (0, 1):
        assert {r["deterministic"] for r in read_jsonl(f"{probe_run.probe}.rank{rank}")} == {False}


class Seeds(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.initial_seed()


def test_each_sample_draws_from_its_own_seed_on_any_worker_or_rank():
    cfg = lenet_cfg("num_workers=2", "eval_batch_size=1")
    seeds = []
    for rank in (0, 1):
        processes = SimpleNamespace(process_index=rank, num_processes=2, device=torch.device("cpu"))
        loader = make_loader("val", Seeds(), cfg, recipe.load(LENET), processes)
        seeds.append([int(s) for batch in loader for s in batch])
    assert seeds[0] == seeds[1] and len(set(seeds[0])) == 8  # a function of the sample, not the worker


def test_a_small_split_is_evaluated_in_batches_that_every_process_gets():
    """8 samples at eval_batch_size=256 on 2 processes: 2 batches of 4 (Accelerate gives each
    process whole batches), not one of 8 that would leave a process without any."""
    processes = SimpleNamespace(process_index=0, num_processes=2, device=torch.device("cpu"))
    loader = make_loader("val", Seeds(), lenet_cfg("eval_batch_size=256"), recipe.load(LENET), processes)
    assert [len(batch) for batch in loader] == [4, 4]
    alone = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    assert [len(batch) for batch in make_loader("val", Seeds(), lenet_cfg(), recipe.load(LENET), alone)] == [8]


def test_a_step_out_of_memory_is_one_line_that_says_what_fits(tmp_path):
    """The probe's batches of more than 16 samples run out of memory, as a GPU's would: the run
    ends in one line that names the step and its batch, and what trains the same global batch in
    less memory; the summary keeps it."""
    result = launch([PROBE, "batch_size=32", "grad_accum=2", "memory=16", "trackers=[]", f"output_dir={tmp_path}"],
                    cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0] == ("error: step 1 ran out of memory with batch_size=32 per process (eval_batch_size=256): try "
                         "batch_size=16 grad_accum=4 (the same global batch), auto_batch_size=true (which finds it), "
                         "activation_checkpointing=true, precision=bf16 (CUDA out of memory. Tried to allocate "
                         "2.00 GiB (GPU 0; 79.1 GiB total))")
    assert summary(only_run(tmp_path))["error"] == errors[0][len("error: "):]


def test_an_evaluation_out_of_memory_is_one_line_that_names_eval_batch_size(tmp_path):
    """The validation before the first step runs out of memory (100 samples in one batch): the line
    names it and eval_batch_size, not the training step that has not run."""
    result = launch([PROBE, "batch_size=16", "memory=16", "val=100", "trackers=[]", f"output_dir={tmp_path}"],
                    cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors == [
        "error: the validation before step 1 ran out of memory with eval_batch_size=256 per process: try "
        "eval_batch_size=128, auto_batch_size=true (which finds it), precision=bf16 (CUDA out of memory. Tried to "
        "allocate 2.00 GiB (GPU 0; 79.1 GiB total))"], result.stderr[-2000:]


def test_auto_batch_size_settles_where_the_step_fits_and_trains_as_that_size(tmp_path):
    """auto_batch_size=true: the probe runs out of memory above 16 samples a batch; from batch_size
    64 the run settles on 16 x 4 micro-batches (the same global batch) and an eval_batch_size of
    16, says so, and records them in config.yaml. Stopped after an epoch and continued by the same
    command (--autoresume), it trains to the weights of a run configured with those sizes, bit for
    bit: the sizes it tried left nothing behind, and the resume kept the sizes it found."""
    common = [PROBE, "memory=16", "val=100", "trackers=[]"]
    auto = ["--autoresume", *common, "name=auto", "batch_size=64", "auto_batch_size=true", f"output_dir={tmp_path}"]
    ok(launch([*auto, "epochs=1"], cwd=tmp_path))
    run = tmp_path / "probe" / "auto"
    assert ("auto_batch_size: batch_size=64 grad_accum=1 eval_batch_size=256 ran out of memory; the run takes "
            "batch_size=16 grad_accum=4 eval_batch_size=16") in (run / "log.txt").read_text()
    ok(launch([*auto, "epochs=2"], cwd=tmp_path))
    saved = config.resolve(recipe.load(PROBE).config, [run / "config.yaml"])
    assert (saved.batch_size, saved.grad_accum, saved.eval_batch_size, saved.epochs) == (16, 4, 16, 2)
    ok(launch([*common, "epochs=2", "batch_size=16", "grad_accum=4", "eval_batch_size=16",
               f"output_dir={tmp_path / 'set'}"], cwd=tmp_path))
    assert_same_weights(load_file(run / "model.safetensors"),
                        load_file(only_run(tmp_path / "set") / "model.safetensors"))


def test_auto_batch_size_agrees_on_one_size_in_every_process(tmp_path):
    """Only rank 1 runs out of memory above 16 samples: both processes take its size (a process
    that trained at another size would hang the gradients' all-reduce, or train another batch)."""
    ok(launch_two([PROBE, "memory=16", "memory_rank=1", "batch_size=48", "auto_batch_size=true", "epochs=1",
                   "trackers=[]", f"output_dir={tmp_path}"], cwd=tmp_path))
    saved = config.resolve(recipe.load(PROBE).config, [only_run(tmp_path) / "config.yaml"])
    assert (saved.batch_size, saved.grad_accum) == (12, 4)  # 48 -> 24 -> 12: 12 x 4 is 48 samples again
    assert summary(only_run(tmp_path))["steps"] == 3  # 256 samples over 2 processes: 128 per process
