"""recipes/gpt.py: a byte-level GPT on the standard library's sources, padded variable-length batches."""

import math

import pytest
import torch

from helpers import REPO, launch, only_run, read_jsonl, summary
from toolkit import UserError, config, recipe

GPT = str(REPO / "recipes" / "gpt.py")
# A model of 22,000 parameters on 40 kB of text: 71 steps an epoch, a second on a CPU.
TINY = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=16", "data.max_bytes=40000",
        "trackers=[]"]
# Its steps are too small to share between threads: on 2 busy cores, 2 threads took 8.8 s for that epoch, 1 took 0.7 s.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def gpt():
    return recipe.load(GPT)


def resolve(gpt, *overrides):
    return config.resolve(gpt.config, [], [*TINY, *overrides])


def test_gpt_learns_stdlib_text_and_reports_bits_per_byte(tmp_path, gpt):
    # 1. Train an epoch through the command line.
    result = launch([GPT, *TINY, "epochs=1", "log_every=10", "optim.lr=3e-3", "sched.warmup_steps=10",
                     f"output_dir={tmp_path}"], cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)

    # 2. The training loss went down, and the model predicts held-out files better than uniform bytes (8 bits).
    train = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert train[-1]["bpb"] < train[0]["bpb"] - 1
    done = summary(run)
    assert done["status"] == "finished"
    assert done["best"]["monitor"] == "val/bpb"
    for split in ("val", "test"):
        assert 0 < done[split]["bpb"] < 6

    # 3. Evaluation counts every target byte of each split once: each chunk's bytes but its first.
    splits = gpt.datasets(resolve(gpt))
    for split in ("val", "test"):
        assert done[split]["tokens"] == sum(len(chunk) - 1 for chunk in splits[split])
        assert done[split]["samples"] == len(splits[split])


def test_collate_pads_with_ignored_targets_and_the_loss_counts_real_targets_only(gpt):
    chunks = [torch.tensor(list(b"def f(x):"), dtype=torch.uint8), torch.tensor(list(b"pass"), dtype=torch.uint8),
              torch.tensor(list(b"x = 1"), dtype=torch.uint8)]
    inputs, targets = gpt.collate(chunks)

    # Inputs and targets are the chunks shifted by one byte, padded on the right to the longest chunk.
    assert inputs.shape == targets.shape == (3, 8)
    assert bytes(inputs[1, :3].tolist()) == b"pas" and bytes(targets[1, :3].tolist()) == b"ass"
    assert targets[1, 3:].tolist() == [-100] * 5 and inputs[1, 4:].tolist() == [0] * 4
    assert targets[2, 4:].tolist() == [-100] * 4

    # The loss is per real target: 8 + 3 + 4 of them; what the pads hold does not change it.
    torch.manual_seed(0)
    net = gpt.model(resolve(gpt))
    loss, counts = gpt.loss(net, (inputs, targets), None)
    assert counts["samples"] == 3
    assert int(counts["tokens"]) == 15
    noisy = inputs.clone()
    noisy[targets == -100] = torch.randint(0, 256, (int((targets == -100).sum()),))
    noisy_loss, _ = gpt.loss(net, (noisy, targets), None)
    assert torch.equal(noisy_loss, loss)
    assert gpt.metrics({"nll": 45 * math.log(2), "tokens": 15}) == {"bpb": pytest.approx(3.0), "tokens": 15}


def test_stdlib_split_is_by_file_disjoint_and_fixed(gpt):
    files = gpt.module.stdlib_files()
    again = gpt.module.stdlib_files()
    assert files == again
    names = {split: {path.as_posix() for path in paths} for split, paths in files.items()}
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert all(paths == sorted(paths) for paths in files.values())
    total = sum(len(paths) for paths in files.values())
    assert 0.02 * total < len(files["val"]) < 0.1 * total and 0.02 * total < len(files["test"]) < 0.1 * total
    assert not any("site-packages" in name for paths in names.values() for name in paths)

    # More text (data.max_bytes) adds files; the ones already used stay in their split.
    small, large = gpt.datasets(resolve(gpt)), gpt.datasets(resolve(gpt, "data.max_bytes=80000"))
    for split in ("train", "val", "test"):
        assert torch.equal(large[split].data[:len(small[split].data)], small[split].data)
    first = files["val"][0].read_bytes()[:100]
    assert large["val"].data[:len(first)].numpy().tobytes() == first


def test_too_little_text_and_an_unreachable_corpus_are_one_line_each(tmp_path, gpt):
    with pytest.raises(UserError, match="the val split holds no sample"):
        gpt.datasets(resolve(gpt, "data.max_bytes=20"))

    result = launch([GPT, *TINY, "data.source=https://corpus.invalid/input.txt", f"data.root={tmp_path / 'data'}",
                     f"output_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 2
    assert result.stderr.startswith("error: data.source=https://corpus.invalid/input.txt: cannot download")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_corpus_already_in_data_root_is_used_without_download_and_cut_by_position(tmp_path, gpt):
    text = bytes(range(32, 127)) * 100  # 9,500 bytes
    (tmp_path / "tiny.txt").write_bytes(text)
    splits = gpt.datasets(resolve(gpt, "data.source=https://corpus.invalid/tiny.txt", f"data.root={tmp_path}",
                                  "data.max_bytes=0"))
    assert [len(splits[s].data) for s in ("train", "val", "test")] == [8550, 475, 475]
    assert b"".join(splits[s].data.numpy().tobytes() for s in ("train", "val", "test")) == text
    # Chunks of up to block_size + 1 = 33 bytes, overlapping by one: every byte but the first is a target once.
    assert sum(len(chunk) - 1 for chunk in splits["train"]) == 8549
    assert max(len(chunk) for chunk in splits["train"]) == 33
