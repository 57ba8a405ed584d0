"""The HuggingFace stack: a tied GPT-2 on an HF stream, resumed bit for bit, exported for
`from_pretrained`; weights shared by two names; every run ending with a validation."""

import pytest
import torch

from helpers import REPO, assert_same_weights, launch, launch_two, ok, only_run, records, summary, weights
from toolkit import UserError
from toolkit.state import checkpoint
from toolkit.state.weights import load_weights, write_safetensors

GPT2 = str(REPO / "tests" / "recipes" / "hf_gpt2.py")
COMMON = [GPT2, "num_workers=0", "ema.decay=0.9", "checkpoint.every_steps=4"]  # the stream read between steps


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    ok(launch([*COMMON, f"output_dir={folder}"], cwd=folder))
    return only_run(folder)


def test_a_tied_gpt2_on_an_hf_stream_resumes_bit_for_bit(tied_run, tmp_path):
    # 1. The unbroken run (12 steps, max_steps mid-epoch) ended with a validation, a best and its export.
    final = summary(tied_run)
    assert final["status"] == "finished" and final["steps"] == 12
    assert [r["step"] for r in records(tied_run, "val")] == [12] and final["best"]["checkpoint"] == "step-0000012"
    assert (tied_run / "model.safetensors").is_file() and (tied_run / "model_ema.safetensors").is_file()

    # 2. The same run stopped at step 6, 3. resumed to step 12: the same weights, bit for bit.
    ok(launch([*COMMON, "max_steps=6", f"output_dir={tmp_path}"], cwd=tmp_path))
    stopped = only_run(tmp_path)
    ok(launch(["resume", stopped, "max_steps=12"], cwd=tmp_path))
    assert_same_weights(weights(tied_run), weights(stopped))
    assert summary(stopped)["val"] == final["val"]


def test_a_tied_gpt2_exports_for_from_pretrained(tied_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from toolkit import config, recipe

    # 1. Export the best checkpoint; 2. from_pretrained gives the run's model: tied, the same logits.
    result = ok(launch(["export", tied_run, tmp_path / "hf"], cwd=tmp_path))
    assert f"to {tmp_path / 'hf'}: GPT2LMHeadModel.save_pretrained (its from_pretrained(OUT) loads it)" in result.stdout
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    module = recipe.load(GPT2)
    cfg = config.resolve(module.config, [tied_run / "config.yaml"])
    ours = module.model(cfg)
    load_weights(ours, tied_run / "model.safetensors", strict=True)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.eval()(ids).logits, ours.eval()(ids).logits)

    # 3. init_from takes the exported folder; 4. a folder is not exported over.
    ok(launch([GPT2, f"init_from={tmp_path / 'hf'}", "max_steps=1", "stream=false", f"output_dir={tmp_path}"],
              cwd=tmp_path))
    assert "init_from" in (only_run(tmp_path) / "log.txt").read_text()
    again = launch(["export", tied_run, tmp_path / "hf"], cwd=tmp_path)
    assert again.returncode == 2 and again.stderr == f"error: {tmp_path / 'hf'} exists and is not an empty folder: " \
                                                     f"export into a new one\n"


def test_a_module_that_shares_a_parameter_saves_and_loads_it_once(tmp_path):
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight

    saved = Shared()
    write_safetensors(saved.state_dict(), tmp_path / "w.safetensors")
    loaded = Shared()
    assert load_weights(loaded, tmp_path / "w.safetensors", strict=True) == ([], [])
    assert loaded.b.weight is loaded.a.weight
    assert_same_weights(loaded.state_dict(), saved.state_dict())
    with pytest.raises(UserError, match=r"missing keys \['b.bias'\]"):
        partial = {k: v for k, v in saved.state_dict().items() if k != "b.bias"}
        write_safetensors(partial, tmp_path / "p.safetensors")
        load_weights(Shared(), tmp_path / "p.safetensors", strict=True)


def test_an_hf_stream_counts_every_sample_once_with_two_processes_and_workers(tmp_path):
    """The test table's last cell through the real loop: 2 processes x 2 workers, 1 shard; then
    a resume from the place in the stream that each process saved."""
    ok(launch_two([GPT2, "num_workers=2", "shards=1", "max_steps=2", f"output_dir={tmp_path}"], cwd=tmp_path))
    run = only_run(tmp_path)
    assert summary(run)["status"] == "finished" and summary(run)["val"]["samples"] == 80
    saved = checkpoint.find(run)
    assert [checkpoint.loader_point(saved, rank)["batches"] for rank in (0, 1)] == [2, 2]
    ok(launch_two(["resume", run, "max_steps=3"], cwd=tmp_path))
    assert summary(run)["steps"] == 3 and summary(run)["val"]["samples"] == 80


def test_a_monitor_that_validation_does_not_report_is_refused_before_the_first_step(tmp_path):
    result = launch([GPT2, "checkpoint.monitor=val/accuracy", "max_steps=1000", f"output_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "error: checkpoint.monitor=val/accuracy: validation reports tokens, " \
                                             "loss, samples"
    final = summary(only_run(tmp_path))
    assert final["status"] == "failed" and final["steps"] == 0 and not records(only_run(tmp_path), "train")


CLASSIFY = str(REPO / "recipes" / "hf_classify.py")
TINY_CLASSIFIER = [CLASSIFY, "model.name=tiny", "data.name=stdlib", "data.max_lines=3000", "data.test_split=test",
                   "batch_size=32", "optim.lr=1e-3", "sched.warmup_steps=10", "max_steps=60", "trackers=[]"]


def test_the_hf_classify_recipe_trains_offline_and_exports_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from toolkit import config, recipe

    # 1. Train the tiny BERT on the standard library's lines (2 workers: the collate with its cfg in them).
    ok(launch([*TINY_CLASSIFIER, "num_workers=2", f"output_dir={tmp_path}"], cwd=tmp_path))
    run = only_run(tmp_path)
    final = summary(run)
    assert final["status"] == "finished" and final["val"]["samples"] == 150 and final["test"]["samples"] == 150
    assert final["val"]["accuracy"] > 0.85  # prose or code: the majority class is 0.77

    # 2. Export; 3. from_pretrained of the model and its tokenizer classifies as the run's model does.
    ok(launch(["export", run, tmp_path / "out"], cwd=tmp_path))
    module = recipe.load(CLASSIFY)
    cfg = config.resolve(module.config, [run / "config.yaml"])
    ours = module.model(cfg)
    load_weights(ours, run / "model.safetensors", strict=True)
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    text = AutoTokenizer.from_pretrained(tmp_path / "out")(["return x + 1", "the value to return"],
                                                          padding=True, return_tensors="pt")
    assert torch.equal(theirs.eval()(**text).logits, ours.eval()(**text).logits)


def test_the_hf_classify_recipe_gives_the_same_metrics_with_two_processes(tmp_path):
    """optim.lr=0: the test metrics of 1 process and of 2 are those of the same weights, each sample once."""
    args = [*TINY_CLASSIFIER, "optim.lr=0", "max_steps=2"]
    ok(launch([*args, f"output_dir={tmp_path / 'one'}"], cwd=tmp_path))
    ok(launch_two([*args, f"output_dir={tmp_path / 'two'}"], cwd=tmp_path))
    one, two = (summary(only_run(tmp_path / name)) for name in ("one", "two"))
    assert one["test"]["samples"] == two["test"]["samples"] == 150
    assert one["test"]["accuracy"] == two["test"]["accuracy"]  # integer counts, summed exactly, then divided
