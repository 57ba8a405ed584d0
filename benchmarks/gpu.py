"""GPU checks of the toolkit in one command, on one NVIDIA GPU (sized for an H200): under 8 minutes in
all, ending with one table of check, seconds, figures and result (PASS, FAIL or the measured value).

  fsdp     recipes/lenet.py under accelerate_configs/fsdp.yaml (FSDP2) in one process: a run of
           FSDP_STEPS steps, and a run stopped half way (max_steps) then continued to FSDP_STEPS by
           `launch.py resume` under the same launcher. PASS: both latest checkpoints are FSDP's
           sharded ones, their weights are equal bit for bit, and both runs report test metrics.
           deterministic=true (cuDNN's default kernels are not bitwise repeatable) and a constant
           LR after the warmup (a cosine schedule is a function of max_steps).
  fp16     recipes/lenet.py with precision=fp16 (Accelerate's gradient scaler) for FP16_STEPS steps.
           PASS: it finishes and every logged train loss is finite; the figures give the steps
           that the scaler skipped (metrics.jsonl's skipped_steps).
  resnet   recipes/resnet_cifar.py (ResNet-20) on random CIFAR-10-shaped binary files written here
           (uint8 images and labels; data.root, no download), bf16 + channels_last + compile, a
           constant LR, no augmentation and no val split. Images/s of (a) the toolkit, launch.py's
           main() in a child process, timed by its train windows in metrics.jsonl, and (b) a
           hand-written loop of the same model, data path (batches sliced from the uint8 tensors,
           normalised by the recipe, pinned and copied), batch, bf16 autocast and SGD, over steps
           WARMUP+1 .. WARMUP+STEPS of each run, in PAIRS pairs run a b, b a, a b, ... as in
           bench_gpt.py. Result: the median of the per-pair ratios a / b.
  gpt      benchmarks/bench_gpt.py precision=bf16 compile=true data.max_bytes=0: tokens/s of
           recipes/gpt.py, toolkit and hand-written, 5 pairs (its docstring). Result: its median
           wall-clock ratio toolkit / hand-written.
  gpt_mfu  a short run of recipes/gpt.py with bf16 + compile. Result: the mfu of its last train
           window in metrics.jsonl (toolkit.distributed.PEAK_FLOPS must know the GPU).
  peers    benchmarks/bench_peers.py --gpu (bert-base's shape, bf16) with fewer rounds and lines
           than its defaults, to fit the budget. Result: the medians of its per-round ratios
           toolkit / transformers.Trainer and toolkit / a plain Accelerate loop.

LeNet reads Fashion-MNIST from $FASHION_MNIST (default /usr/share/datasets/fashion-mnist), or, where
that is not installed, random IDX files written here. Nothing is downloaded.

The checks run in the order above, each command in a process of its own with its own timeout
(TIMEOUTS), and all of them within BUDGET_S (7.5 minutes): a command is not started once the
budget is spent. A check that fails or runs past its time prints FAIL with the first line of its
error, and the next one goes on. Exit status: 0 when no check failed, 1 otherwise, 2 without a GPU.

    python benchmarks/gpu.py                       # every check
    python benchmarks/gpu.py --checks fsdp,fp16    # some of them
    python benchmarks/gpu.py --dry-run             # print the commands and run nothing (any machine)
"""

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import FASHION_MNIST, REPO, records, table

from toolkit.data.readers import CIFAR10_FILES, MNIST_FILES  # noqa: E402 - common puts the repository on the path

BUDGET_S = 450  # every check together; 30 s spare under 8 minutes
TIMEOUTS = {"fsdp": 45, "fp16": 45, "resnet": 150, "gpt": 210, "gpt_mfu": 60, "peers": 150}  # s, per command
FSDP_STEPS, FP16_STEPS = 60, 200
WARMUP, STEPS, PAIRS = 20, 300, 5  # resnet: steps WARMUP+1 .. WARMUP+STEPS of each run are timed
BATCH = 128  # resnet_cifar.py's batch size
PYTHON = sys.executable
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
FSDP_LAUNCH = [ACCELERATE, "launch", "--config_file", "accelerate_configs/fsdp.yaml", "--num_processes", "1",
               "launch.py"]
GPT_BENCH = [PYTHON, "benchmarks/bench_gpt.py", "precision=bf16", "compile=true", "data.max_bytes=0"]
PEERS_BENCH = [PYTHON, "benchmarks/bench_peers.py", "--gpu", "--pairs", "3", "--lines", "6000"]
STARTED = time.perf_counter()


# ---------------------------------------------------------------------------------------------
# Running commands

def run(command, timeout, what):
    """Run `command` in the repository and return its stdout. A failure raises RuntimeError with
    the informative line of its output; past `timeout` seconds, or the end of the budget, the
    command and its children (an accelerate launch's workers) are killed."""
    left = BUDGET_S - (time.perf_counter() - STARTED)
    if left < 10:
        raise RuntimeError(f"{what} not run: the budget of {BUDGET_S} s is spent")
    limit = min(timeout, left)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=limit)
    except BaseException as e:  # a timeout, or Ctrl-C: stop the whole process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise RuntimeError(f"{what} timed out after {limit:.0f} s") from None
        raise
    if process.returncode:
        raise RuntimeError(f"{what} failed (exit status {process.returncode}): {error_line(err + out)}")
    return out


def error_line(output):
    """The line that says what went wrong: the toolkit's first `error: ...`, else the last exception
    line that is not a launcher's report of its child's failure, else the last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in output.splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[0]
    exceptions = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)
                  and "CalledProcessError" not in line and "ChildFailedError" not in line]
    return (exceptions or lines or ["no output"])[-1]


def run_folder(output_dir):
    """The one run folder under a run's output_dir (<output_dir>/<recipe>/<run>)."""
    folders = sorted(Path(output_dir).glob("*/*"))
    if len(folders) != 1:
        raise RuntimeError(f"expected one run folder under {output_dir}, found {len(folders)}")
    return folders[0]


def summary(run):
    return json.loads((Path(run) / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# Data written here

def fashion_mnist_installed():
    return all(any((Path(FASHION_MNIST) / f"{name}{ext}").is_file() for ext in ("", ".gz"))
               for pair in MNIST_FILES.values() for name in pair)


def lenet_data(work):
    """LeNet's data overrides: Fashion-MNIST where it is installed, else the files write_lenet_data writes."""
    if fashion_mnist_installed():
        return ["data.name=fashion_mnist", f"data.root={FASHION_MNIST}", "data.download=false"]
    return ["data.name=fashion_mnist", f"data.root={work / 'fashion'}", "data.download=false", "data.val_size=1000"]


def write_lenet_data(work):
    """Random 28x28 IDX files (6,000 train, 1,000 test) where Fashion-MNIST is not installed; the overrides."""
    folder = work / "fashion"
    if not fashion_mnist_installed() and not folder.is_dir():
        folder.mkdir(parents=True)
        generator = torch.Generator().manual_seed(0)
        for split, n in (("train", 6000), ("test", 1000)):
            images, labels = MNIST_FILES[split]
            write_idx(folder / images, torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator))
            write_idx(folder / labels, torch.randint(0, 10, (n,), dtype=torch.uint8, generator=generator))
    return lenet_data(work)


def write_idx(path, array):
    """A uint8 tensor as an IDX file (the MNIST format)."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def write_cifar(root, train, test):
    """Random CIFAR-10 binary batches in <root>/cifar-10-batches-bin: per image a label byte, then
    3x32x32 pixel bytes; `train` images over the five training files, `test` in the test file."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    sizes = {name: math.ceil(train / len(CIFAR10_FILES["train"])) for name in CIFAR10_FILES["train"]}
    sizes[CIFAR10_FILES["test"][0]] = test
    for name, n in sizes.items():
        rows = torch.randint(0, 256, (n, 3073), dtype=torch.uint8, generator=generator)
        rows[:, 0] = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=generator)
        (folder / name).write_bytes(rows.numpy().tobytes())


# ---------------------------------------------------------------------------------------------
# The commands

def fsdp_command(output_dir, steps, data):
    return [*FSDP_LAUNCH, "recipes/lenet.py", *data, f"max_steps={steps}", "sched.name=constant",
            "deterministic=true", "log_every=10", "trackers=[]", f"output_dir={output_dir}"]


def fsdp_resume_command(run, steps):
    return [*FSDP_LAUNCH, "resume", str(run), f"max_steps={steps}"]


def fp16_command(output_dir, data):
    return [PYTHON, "launch.py", "recipes/lenet.py", *data, "precision=fp16", f"max_steps={FP16_STEPS}",
            "log_every=20", "trackers=[]", f"output_dir={output_dir}"]


def resnet_overrides(root):
    """The toolkit's side of the resnet check (and the hand-written loop's config)."""
    return [f"data.root={root}", "data.download=false", "data.val_size=0", "data.augment=false",
            f"batch_size={BATCH}", "precision=bf16", "channels_last=true", "compile=true", "sched.name=constant",
            "epochs=1", f"max_steps={WARMUP + STEPS}", f"log_every={WARMUP}", "val_every=0", "limit_batches.test=1",
            "checkpoint.every_epochs=0", "checkpoint.monitor=", "trackers=[]"]


def resnet_command(root):
    return [PYTHON, "benchmarks/gpu.py", "--resnet", str(root)]


def gpt_mfu_command(output_dir):
    return [PYTHON, "launch.py", "recipes/gpt.py", "precision=bf16", "compile=true", "max_steps=75", "log_every=25",
            "val_every=0", "sanity_val_batches=0", "limit_batches.val=1", "limit_batches.test=1",
            "checkpoint.every_epochs=0", "checkpoint.monitor=", "trackers=[]", f"output_dir={output_dir}"]


def plan(name, work):
    """What check `name` runs, as lines to print (--dry-run); commands run in the repository."""
    data = lenet_data(work)
    half = work / "fsdp-half"
    root = work / "cifar"
    lines = {
        "fsdp": [fsdp_command(work / "fsdp-unbroken", FSDP_STEPS, data),
                 fsdp_command(half, FSDP_STEPS // 2, data),
                 fsdp_resume_command(half / "lenet" / "<its run>", FSDP_STEPS),
                 "then: the latest checkpoints' weights, torch.equal tensor by tensor; summary.json's test"],
        "fp16": [fp16_command(work / "fp16", data)],
        "resnet": [f"first: random CIFAR-10 binary files, {(WARMUP + STEPS) * BATCH} train and 256 test images, "
                   f"in {root}",
                   resnet_command(root),
                   f"which runs {PAIRS} pairs of, in its own process:",
                   ["launch.py", "recipes/resnet_cifar.py", *resnet_overrides(root), "output_dir=<a temporary folder>"],
                   "and a hand-written loop of the same model, data, batch, bf16 autocast and SGD"],
        "gpt": [GPT_BENCH],
        "gpt_mfu": [gpt_mfu_command(work / "gpt")],
        "peers": [PEERS_BENCH],
    }[name]
    if name in ("fsdp", "fp16") and not fashion_mnist_installed():
        lines.insert(0, f"first: random IDX files in {work / 'fashion'} ({FASHION_MNIST} has no Fashion-MNIST)")
    return [line if isinstance(line, str) else shlex.join(map(str, line)) for line in lines]


# ---------------------------------------------------------------------------------------------
# The checks: each returns (figures, result) or raises

def check_fsdp(work):
    data = write_lenet_data(work)
    half = FSDP_STEPS // 2
    run(fsdp_command(work / "fsdp-unbroken", FSDP_STEPS, data), TIMEOUTS["fsdp"], "the unbroken run")
    run(fsdp_command(work / "fsdp-half", half, data), TIMEOUTS["fsdp"], f"the run of {half} steps")
    unbroken, resumed = run_folder(work / "fsdp-unbroken"), run_folder(work / "fsdp-half")
    run(fsdp_resume_command(resumed, FSDP_STEPS), TIMEOUTS["fsdp"], "the resumed run")

    checkpoints = [latest_checkpoint(folder) for folder in (unbroken, resumed)]
    sharded = all((c / "pytorch_model_fsdp_0").is_dir() for c in checkpoints)
    a, b = (checkpoint_weights(c) for c in checkpoints)
    differ = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]
    tests = [summary(folder).get("test", {}) for folder in (unbroken, resumed)]
    steps = [summary(folder).get("steps") for folder in (unbroken, resumed)]
    figures = (f"{steps[0]} steps vs {half} + resume to {steps[1]}: "
               + (f"all {len(a)} tensors equal" if not differ else f"{len(differ)} of {len(a)} tensors differ "
                  f"({', '.join(differ[:3])})")
               + f"; test accuracy {' / '.join(format_value(t.get('accuracy')) for t in tests)}"
               + f"; checkpoints {'sharded (pytorch_model_fsdp_0)' if sharded else 'not sharded: FSDP was not used'}")
    passed = not differ and sharded and all(tests) and steps == [FSDP_STEPS, FSDP_STEPS]
    return figures, "PASS" if passed else "FAIL"


def latest_checkpoint(run):
    checkpoints = sorted((Path(run) / "checkpoints").glob("step-*"))
    if not checkpoints:
        raise RuntimeError(f"{run} has no checkpoint")
    return checkpoints[-1]


def checkpoint_weights(checkpoint):
    """{name: tensor} of a checkpoint's model: its model.safetensors, or FSDP's sharded folder
    (torch.distributed.checkpoint) gathered into one file."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if (checkpoint / "model.safetensors").is_file():
        return load_file(checkpoint / "model.safetensors")
    gathered = checkpoint.parent.parent / f"{checkpoint.name}-gathered.pt"  # in the run folder
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", gathered)
    return torch.load(gathered, weights_only=True)["model"]


def format_value(value):
    return "-" if value is None else f"{value:.4f}"


def check_fp16(work):
    run(fp16_command(work / "fp16", write_lenet_data(work)), TIMEOUTS["fp16"], "the fp16 run")
    folder = run_folder(work / "fp16")
    train, result = records(folder, "train"), summary(folder)
    losses = [r["loss"] for r in train]
    skipped = sum(r.get("skipped_steps", 0) for r in train)
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    figures = (f"{result['steps']} steps, status {result['status']}, train loss "
               f"{format_value(losses[0] if losses else None)} -> {format_value(losses[-1] if losses else None)}, "
               f"{skipped} steps skipped by the scaler, test accuracy "
               f"{format_value(result.get('test', {}).get('accuracy'))}")
    return figures, "PASS" if result["status"] == "finished" and finite else "FAIL"


def check_resnet(work):
    root = work / "cifar"
    write_cifar(root, train=(WARMUP + STEPS) * BATCH, test=256)
    output = run(resnet_command(root), TIMEOUTS["resnet"], "the resnet pairs")
    rates = json.loads(output.strip().splitlines()[-1])
    ratios = [a / b for a, b in zip(rates["toolkit"], rates["hand_written"])]
    figures = (f"images/s toolkit {statistics.median(rates['toolkit']):,.0f}, hand-written "
               f"{statistics.median(rates['hand_written']):,.0f} (medians of {PAIRS}); ratios per pair "
               f"{', '.join(f'{r:.3f}' for r in ratios)}")
    return figures, f"{statistics.median(ratios):.3f}"


def check_gpt(work):
    output = run(GPT_BENCH, TIMEOUTS["gpt"], "bench_gpt.py")
    toolkit = figures_of(output, "(a) toolkit, wall clock")[-1]
    hand_written = figures_of(output, "(b) hand-written, wall clock")[-1]
    ratios = figures_of(output, "a / b, wall clock")
    flops = re.search(r"did ([\d.]+) GFLOP/s", output)
    figures = (f"tokens/s toolkit {toolkit:,.0f}, hand-written {hand_written:,.0f} (medians); ratios per pair "
               f"{', '.join(f'{r:.3f}' for r in ratios[:-1])}"
               + (f"; toolkit {float(flops.group(1)):,.1f} GFLOP/s" if flops else ""))
    return figures, f"{ratios[-1]:.3f}"


def figures_of(output, label):
    """The numbers of bench_gpt's table row `label` (its pairs, then their median)."""
    line = next((line for line in output.splitlines() if line.startswith(label)), None)
    if line is None:
        raise RuntimeError(f"bench_gpt.py printed no row {label!r}")
    return [float(x.replace(",", "")) for x in line[len(label):].split()]


def check_gpt_mfu(work):
    run(gpt_mfu_command(work / "gpt"), TIMEOUTS["gpt_mfu"], "the gpt run")
    train = records(run_folder(work / "gpt"), "train")
    if not train or "mfu" not in train[-1]:
        return (f"no mfu in metrics.jsonl's train records: is {torch.cuda.get_device_name()} in "
                f"toolkit.distributed.PEAK_FLOPS?"), "FAIL"
    last = train[-1]
    first = (train[-2]["step"] if len(train) > 1 else 0) + 1
    figures = (f"steps {first}-{last['step']}: "
               f"{last['tokens_per_s']:,.0f} tokens/s; mfu per train window "
               f"{', '.join(format_value(r['mfu']) for r in train)} (the first one compiles)")
    return figures, format_value(last["mfu"])


def check_peers(work):
    output = run(PEERS_BENCH, TIMEOUTS["peers"], "bench_peers.py")
    lines = [line for line in output.splitlines() if line.startswith("toolkit / ")]
    medians = [re.match(r"toolkit / (\w+): median ([\d.]+)", line) for line in lines]
    if not lines or None in medians:
        raise RuntimeError("bench_peers.py printed no 'toolkit / PEER: median ...' line")
    return "; ".join(lines), ", ".join(f"{m.group(1)} {m.group(2)}" for m in medians)


CHECKS = {"fsdp": check_fsdp, "fp16": check_fp16, "resnet": check_resnet, "gpt": check_gpt,
          "gpt_mfu": check_gpt_mfu, "peers": check_peers}


def run_check(name, work):
    """One row of the table: the check's name, seconds, figures and result; a failure is a FAIL row."""
    start = time.perf_counter()
    try:
        figures, result = CHECKS[name](work)
    except Exception as e:  # noqa: BLE001 - any failure is this check's FAIL; the next check goes on
        lines = str(e).strip().splitlines() or [""]
        figures, result = f"{type(e).__name__}: {lines[0]}", "FAIL"
    seconds = time.perf_counter() - start
    print(f"{name}: {result} in {seconds:.0f} s: {figures}", flush=True)
    return [name, f"{seconds:.0f}", figures, result]


# ---------------------------------------------------------------------------------------------
# The resnet pairs, in their own process (python benchmarks/gpu.py --resnet ROOT)

def resnet_pairs(root):
    """PAIRS pairs of toolkit and hand-written runs; prints their images/s as one JSON line."""
    from toolkit import config, recipe
    from toolkit.data import readers

    resnet = recipe.load(REPO / "recipes" / "resnet_cifar.py")
    overrides = resnet_overrides(root)
    cfg = config.resolve(resnet.config, [], overrides)
    images, labels = readers.load_cifar10(root, download=False)["train"]
    toolkit, hand_written = [], []
    for i in range(PAIRS):
        if i % 2 == 0:
            toolkit.append(resnet_toolkit(overrides))
            hand_written.append(resnet_hand_written(resnet, cfg, images, labels))
        else:
            hand_written.append(resnet_hand_written(resnet, cfg, images, labels))
            toolkit.append(resnet_toolkit(overrides))
    print(json.dumps({"toolkit": toolkit, "hand_written": hand_written}))


def resnet_toolkit(overrides):
    """Images per second of steps WARMUP+1 .. WARMUP+STEPS of launch.py's main() in this process."""
    import launch

    out = Path(tempfile.mkdtemp(prefix="gpu-resnet-"))
    args = [str(REPO / "recipes" / "resnet_cifar.py"), *overrides, f"output_dir={out}"]
    console = io.StringIO()
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        status = launch.main(args)
    if status:
        raise RuntimeError(f"launch.py {shlex.join(args)} failed:\n{console.getvalue()[-3000:]}")
    warmup, *windows = records(run_folder(out), "train")
    shutil.rmtree(out)
    # Each record's "time" is when it was written, after its window's steps (and a host sync).
    return sum(w["samples"] for w in windows) / (windows[-1]["time"] - warmup["time"])


def resnet_hand_written(resnet, cfg, images, labels):
    """Images per second of steps WARMUP+1 .. WARMUP+STEPS of the same training, written out."""
    device = torch.device("cuda")
    torch.manual_seed(cfg.seed)
    model = resnet.model(cfg).to(device, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # the toolkit's groups: no decay on biases and norms
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    model.compile()
    model.train()
    order = torch.randperm(len(images))
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            torch.cuda.synchronize()
            start = time.perf_counter()
        index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x, y = resnet.normalize((images[index], labels[index]))
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return STEPS * cfg.batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--resnet", metavar="ROOT", help=argparse.SUPPRESS)  # the resnet check's child process
    args = parser.parse_args()
    checks = args.checks.split(",")
    unknown = [name for name in checks if name not in CHECKS]
    if unknown:
        parser.error(f"unknown check {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    if args.dry_run:
        work = Path(tempfile.gettempdir()) / "gpu-check-<new>"
        print(f"in {REPO}; {work} stands for the temporary folder of a real run\n")
        for name in checks:
            print(f"{name} (timeout {TIMEOUTS[name]} s per command):")
            for line in plan(name, work):
                print(f"  {line}")
            print()
        return 0
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False here "
              "(--dry-run prints its commands)", file=sys.stderr)
        return 2
    if args.resnet:
        resnet_pairs(Path(args.resnet))
        return 0

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; checks {', '.join(checks)}; "
          f"budget {BUDGET_S} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        rows = [run_check(name, work) for name in checks]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"{time.perf_counter() - STARTED:.0f} s in all\n")
    table(rows, ["check", "s", "figures", "result"])
    return 1 if any(row[-1] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
