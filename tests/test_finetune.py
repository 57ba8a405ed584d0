"""Fine-tuning as HF users do it: a peft LoRA adapter on a frozen base, whose checkpoints hold
what trains (the frozen tensors are rebuilt and checked), resumed bit for bit, tested, exported
as an adapter and merged, and loaded back by init_from."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, assert_same_weights, launch, launch_two, ok, only_run, records, summary

GPT2 = str(REPO / "tests" / "recipes" / "hf_gpt2.py")
LORA = [GPT2, "lora=4", "ema.decay=0.9", "checkpoint.every_steps=4"]

pytest.importorskip("peft", reason="peft is in the [dev] extra")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    ok(launch([*LORA, f"output_dir={folder}"], cwd=folder))
    return only_run(folder)


def latest(run):
    return run / "checkpoints" / "latest"


def test_a_lora_checkpoint_holds_what_trains_and_resumes_bit_for_bit(lora_run, tmp_path):
    """The checkpoint's model file holds the adapter (and frozen.json the base's digest), not the
    frozen base; stopped at step 6 and resumed, the run ends with the unbroken run's weights."""
    saved = load_file(latest(lora_run) / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    adapter_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    assert (latest(lora_run) / "model.safetensors").stat().st_size <= 3 * adapter_bytes
    assert all("lora_" in name for name in load_file(latest(lora_run) / "ema.safetensors"))
    assert len(json.loads((latest(lora_run) / "frozen.json").read_text())["names"]) > len(saved)

    ok(launch([*LORA, "max_steps=6", f"output_dir={tmp_path}"], cwd=tmp_path))
    stopped = only_run(tmp_path)
    ok(launch(["resume", stopped, "max_steps=12"], cwd=tmp_path))
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(load_file(latest(lora_run) / name), load_file(latest(stopped) / name))
    assert summary(stopped)["val"] == summary(lora_run)["val"]

    # `test` rebuilds the base and loads the adapter: the run's own numbers.
    result = launch(["test", lora_run, "--split", "val"], cwd=tmp_path)
    ok(result)
    assert f"loss={summary(lora_run)['val']['loss']:.6g}" in result.stdout


def test_a_resume_whose_frozen_base_differs_is_refused(lora_run, tmp_path):
    """A checkpoint without its frozen tensors trusts model(cfg) to rebuild them: one whose digest
    differs (here: the record changed, as a changed base would change it) stops the resume."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run, symlinks=True)
    record = latest(run) / "frozen.json"
    changed = json.loads(record.read_text())
    changed["sha256"] = "0" * 64
    record.write_text(json.dumps(changed))
    result = launch(["resume", run, "max_steps=16"], cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert "frozen tensors that the recipe's model(cfg) (with init_from) builds now differ from the run's" in errors[0]


def test_a_lora_run_exports_its_adapter_and_the_merged_model_and_starts_from_them(lora_run, tmp_path):
    """export: the adapter folder, which PeftModel.from_pretrained(base, OUT) loads; --merge: a
    plain transformers folder with the same logits; init_from takes either into the recipe's
    peft model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from toolkit import config, recipe

    ok(launch(["export", lora_run, tmp_path / "adapter"], cwd=tmp_path))
    ok(launch(["export", lora_run, tmp_path / "merged", "--merge"], cwd=tmp_path))
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    gpt2 = recipe.load(GPT2)
    base = gpt2.model(config.resolve(gpt2.config, [], []))  # lora=0: the base alone, as the run built it
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-5)

    for source in ("adapter", "merged"):
        result = launch([GPT2, "lora=4", "max_steps=2", f"init_from={tmp_path / source}",
                         f"output_dir={tmp_path / 'from'}"], cwd=tmp_path)
        ok(result)
        said = result.stderr + result.stdout
        assert f"init_from {tmp_path / source}: missing keys none, unexpected keys none" in said


def test_export_merge_of_a_model_without_an_adapter_is_one_line(tmp_path):
    ok(launch([GPT2, "max_steps=2", f"output_dir={tmp_path}"], cwd=tmp_path))
    result = launch(["export", only_run(tmp_path), tmp_path / "out", "--merge"], cwd=tmp_path)
    assert result.returncode != 0
    assert "error: --merge merges a peft adapter into its base model; the recipe's model is a GPT2LMHeadModel" \
        in result.stderr


def test_a_frozen_backbone_is_left_out_of_checkpoints_and_rebuilt(tiny, tmp_path):
    """freeze=[features]: LeNet's convolutions train no more; its checkpoints hold the classifier
    alone, and a run stopped after an epoch and resumed ends as the unbroken run, bit for bit."""
    from helpers import LENET

    common = [LENET, *tiny, "freeze=[features]", "limit_batches.train=8", "epochs=2"]
    ok(launch([*common, f"output_dir={tmp_path / 'unbroken'}"], cwd=tmp_path))
    ok(launch([*common, "epochs=1", f"output_dir={tmp_path / 'stopped'}"], cwd=tmp_path))
    stopped = only_run(tmp_path / "stopped")
    assert not any(name.startswith("features.") for name in load_file(latest(stopped) / "model.safetensors"))
    ok(launch(["resume", stopped, "epochs=2"], cwd=tmp_path))
    assert_same_weights(load_file(only_run(tmp_path / "unbroken") / "model.safetensors"),
                        load_file(stopped / "model.safetensors"))


def test_a_lora_checkpoint_of_two_processes_holds_the_adapter_and_tests_alike_in_one(tmp_path):
    """Under DDP the model's names carry its wrapper's prefix: the checkpoint still holds the
    adapter alone, and `launch.py test` in one process gives the run's own validation."""
    ok(launch_two([GPT2, "lora=4", "max_steps=6", f"output_dir={tmp_path}"], cwd=tmp_path))
    run = only_run(tmp_path)
    assert all("lora_" in name for name in load_file(latest(run) / "model.safetensors"))
    result = launch(["test", run, "--split", "val"], cwd=tmp_path)
    ok(result)
    assert f"loss={summary(run)['val']['loss']:.6g}" in result.stdout


def test_activation_checkpointing_of_a_lora_model_gives_the_same_losses(lora_run, tmp_path):
    """activation_checkpointing=true on a peft model: transformers' own, under the adapter, with
    forward's dropout masks in the recompute: the loss curve of the run without it, to the bit."""
    ok(launch([*LORA, "activation_checkpointing=true", f"output_dir={tmp_path}"], cwd=tmp_path))
    assert [r["loss"] for r in records(only_run(tmp_path), "train")] == [r["loss"] for r in records(lora_run, "train")]


# ---------------------------------------------------------------------------------------------
# recipes/lora_lm.py and packing

LORA_LM = str(REPO / "recipes" / "lora_lm.py")
TINY_LM = [LORA_LM, "model.name=tiny", "data.name=stdlib", "optim.lr=3e-3", "data.max_samples=400", "data.val_size=40"]


def test_pack_puts_whole_samples_in_rows_that_restart_their_positions():
    from toolkit.data import pack

    samples = [{"input_ids": [1] * n, "labels": [2] * n} for n in (5, 3, 4, 2)]
    batch = pack(samples, max_len=8)
    assert batch["input_ids"].shape == (2, 8)  # 5 + 3 and 4 + 2 (+ 2 of padding)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]
    # Each sample's first token is predicted from nothing before it; padding is never a target.
    assert batch["labels"].tolist() == [[-100, 2, 2, 2, 2, -100, 2, 2], [-100, 2, 2, 2, -100, 2, -100, -100]]
    with pytest.raises(ValueError, match="a sample of 9 tokens does not fit a packed row of max_len=8"):
        pack([{"input_ids": [1] * 9, "labels": [1] * 9}], max_len=8)


def test_a_packed_batch_gives_the_loss_of_the_padded_one():
    """The tiny Llama of lora_lm.py: the same samples packed into 2 rows, or padded into 6, give
    the same mean token loss (to float rounding): each sample attends to itself alone."""
    from toolkit import config, recipe
    from toolkit.data import pack, padded

    lm = recipe.load(LORA_LM)
    cfg = config.resolve(lm.config, [], TINY_LM[1:])
    net = lm.model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (30, 12, 25, 7, 19, 40):
        ids = torch.randint(3, 200, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    with torch.no_grad():
        losses = [lm.loss(net, {**rows, "samples": 6}, cfg)[0] for rows in (padded(samples), pack(samples, 70))]
    assert pack(samples, 70)["input_ids"].shape[0] == 2
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)


def test_the_lora_lm_recipe_trains_offline_packed_and_exports_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ok(launch([*TINY_LM, "data.pack=true", "max_steps=6", f"output_dir={tmp_path}"], cwd=tmp_path))
    run = only_run(tmp_path)
    assert all("lora_" in name for name in load_file(latest(run) / "model.safetensors"))
    ok(launch(["export", run, tmp_path / "merged", "--merge"], cwd=tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokens = AutoTokenizer.from_pretrained(tmp_path / "merged")("def f(x):", return_tensors="pt")
    assert merged(**tokens).logits.shape[-1] == merged.config.vocab_size


def test_an_exported_adapter_names_its_base_by_a_hub_id_where_it_can(tmp_path):
    """peft records the base as it was loaded: a snapshot folder in the HF cache becomes its hub
    id; a hub id stays; another local path stays, and the export's line says so."""
    from toolkit.state.export import portable_base

    config = tmp_path / "adapter_config.json"
    cached = "/home/me/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/7ae557604adf67be50417f"
    for base, named, said in [(cached, "Qwen/Qwen2.5-0.5B-Instruct", "the hub id of the cached snapshot"),
                              ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", None),
                              (str(tmp_path), str(tmp_path), "names the base by a local path")]:
        config.write_text(json.dumps({"base_model_name_or_path": base, "r": 4}))
        line = portable_base(config)
        assert json.loads(config.read_text()) == {"base_model_name_or_path": named, "r": 4}
        assert (said in line) if said else line == ""
