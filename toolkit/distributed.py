"""The run's processes and what the distributed strategy changes, as plain functions.

- The processes: the process group and its device (CPU or GPU), what a failed peer looks like, the
  peak FLOP/s of the GPUs that a model FLOPs utilisation is measured against.
- The strategy: Accelerate prepares the model for DDP or FSDP, with DDP's options from the config
  (`accelerator_handlers`), and the loop asks here wherever the strategies differ: what the log
  says of it (`describe`), what its errors mean (`explain`), which model an evaluation runs
  (`evaluation_model`), how many forwards a rank runs to match the others (`forwards_to_match`),
  the recipe's own module (`recipe_model`), the gradients' weighing (`scale_gradients`) and the
  EMA's update (`update_ema`). This is the one module that names a strategy: a new one
  (DeepSpeed) is a branch in these functions.
"""

import datetime
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast, parse_flag_from_env

from toolkit import UserError


def start_processes(cfg):
    """The process group (Accelerate's PartialState) and whether it runs on the CPU.

    Without a GPU, several processes talk over gloo; Accelerate alone does this only under
    ACCELERATE_USE_CPU=1 and otherwise runs N unaware copies of the same training."""
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (
        int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available())
    mpi = any(key in os.environ for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ and not mpi:
        # What `accelerate launch --cpu --num_processes N` and MULTI_CPU configs do without mpirun.
        raise UserError("accelerate launch was asked for several CPU processes but started only this one (with "
                        "--cpu or a MULTI_CPU config it expects mpirun); for N processes on CPUs run "
                        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N launch.py ..., "
                        "or torchrun --nproc_per_node N launch.py ...")
    # Imported before the group starts: its functions take `group=group.WORLD` as a default, read at
    # import (torch._dynamo imports it, e.g. from accelerator.prepare). Imported after, they would
    # keep the group alive past destroy_process_group, and gloo's threads, still finishing the last
    # collective as the interpreter exits, abort the process ("terminate called without an active
    # exception").
    from torch.distributed.nn import functional  # noqa: F401
    refuse_a_dropped_strategy(cpu)
    processes = PartialState(cpu=cpu, **group_timeout(cfg))
    quiet_libraries(processes.is_main_process)
    precision = cfg.precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and processes.device.type == "cpu":
        raise UserError("precision=fp16 needs a GPU (on the CPU it would silently train in fp32); "
                        "use precision=bf16 or precision=no")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    return processes, cpu


WATCHDOG_REPORT_MINUTES = 5  # a hung process's watchdog writes its stacks and waits for the others' within this


def group_timeout(cfg):
    """The process group's timeout, after which a collective that waits for a hung process fails:
    longer than watchdog_minutes, so that the watchdog says first where each process was (NCCL's
    default, 10 minutes, would end the run before the default watchdog of 30 could). Off, the
    backend's default."""
    if not cfg.watchdog_minutes:
        return {}
    return {"timeout": datetime.timedelta(minutes=cfg.watchdog_minutes + WATCHDOG_REPORT_MINUTES)}


def refuse_a_dropped_strategy(cpu):
    """A launch that asks for FSDP or DeepSpeed where Accelerate would train DDP instead, silently:
    with ACCELERATE_USE_CPU=1 (`--cpu`), or on a machine without GPUs."""
    strategy = next((name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                     if parse_flag_from_env(flag)), None)
    if strategy is None or (torch.cuda.is_available() and not cpu):
        return
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        raise UserError(f"the launch asks for {strategy} and for the CPU (ACCELERATE_USE_CPU=1 or --cpu), with which "
                        f"Accelerate drops {strategy} and trains DDP: leave out one of the two")
    raise UserError(f"the launch asks for {strategy}, which Accelerate runs on GPUs only: on this machine's CPUs it "
                    f"would train DDP instead; for DDP on CPUs launch without the {strategy} config, e.g. "
                    f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N launch.py ...")


def quiet_libraries(is_main):
    """On every process but the main one, HF `datasets`' progress bars (a recipe's `.map`) and
    `transformers`' warnings and load reports are off: the main process shows them once. The
    variables reach a library imported later; the calls, one imported already."""
    if is_main:
        return
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def lost_a_peer(error):
    """Whether `error` is a collective that failed because another process went away."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                  "NCCL communicator was aborted", "remote process exited"))


def first_line(error):
    """`Type: the first line of its message`: for an error raised in a DataLoader worker (which
    torch raises again with the worker's traceback as its message), the original one's."""
    lines = str(error).splitlines()
    if "Original Traceback (most recent call last):" in lines:
        after = lines[lines.index("Original Traceback (most recent call last):") + 1:]
        raised = [line for line in after if line.strip() and not line.startswith(" ")]
        if raised:
            return raised[0]
    lines = [line.strip() for line in lines if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# Dense bf16/fp16 peak FLOP/s of the GPUs whose name contains the key (their data sheets).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops_per_s(device):
    """The device's peak FLOP/s in bf16/fp16 (the MFU denominator of PaLM and torchtitan), or 0
    where unknown (any CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return 0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), 0)


# ---------------------------------------------------------------------------------------------
# What the strategy changes.

def sharded(accelerator):
    """Whether the model's parameters are split over the processes (FSDP): then every forward
    gathers them, a collective that every rank must run."""
    return accelerator.distributed_type == DistributedType.FSDP


def accelerator_handlers(cfg):
    """The options of the strategy that the config sets, as Accelerate's kwargs handlers: DDP's
    (ddp.*), which Accelerate uses only where it wraps the model in DDP."""
    return [DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp.find_unused_parameters,
                                          static_graph=cfg.ddp.static_graph,
                                          gradient_as_bucket_view=cfg.ddp.gradient_as_bucket_view)]


def describe(accelerator):
    """The strategy in the log's words: `1 process`, `DDP, 2 processes (parameters copied)` or
    `FSDP, 2 processes (parameters sharded)`."""
    n = accelerator.num_processes
    if n == 1:
        return "1 process"
    if sharded(accelerator):
        return f"FSDP, {n} processes (parameters sharded)"
    return f"DDP, {n} processes (parameters copied)"


# DDP's error when a parameter got no gradient in a step: its reducer waits for it forever.
_UNUSED = "Expected to have finished reduction in the prior iteration before starting a new one"


def explain(error):
    """One line for an error that the strategy raised and that a key can fix, else None."""
    if _UNUSED in str(error):
        return ("some parameters of the model got no gradient in a step (not used by loss(), or only in some steps), "
                "which DDP does not allow by default: set ddp.find_unused_parameters=true, or freeze them "
                "(freeze=[...])")
    return None


def recipe_model(accelerator, model):
    """The module the recipe built, inside what `prepare` wrapped it in (DDP, torch.compile): for
    reading it (its parameters, its FLOPs), not for a forward that must be distributed."""
    return accelerator.unwrap_model(model)


def evaluation_model(accelerator, model):
    """The model an evaluation runs. Under DDP, the unwrapped module: its forward runs no
    collective, so ranks may run different numbers of batches, and each takes rank 0's buffers
    (BatchNorm statistics drift apart between DDP's broadcasts), so that every rank evaluates the
    same model. Sharded, the prepared model itself: its forward gathers the weights."""
    if sharded(accelerator):
        return model
    net = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        for buffer in net.buffers():
            broadcast(buffer, from_process=0)
    return net


def forwards_to_match(accelerator, batches):
    """How many forwards this rank runs after its `batches` evaluation batches (repeating its last
    one, whose result is ignored) so that every rank runs as many as the busiest one: none, unless
    the weights are sharded, where each forward is a collective."""
    if not sharded(accelerator):
        return 0
    most = max(accelerator.gather(torch.tensor([batches], device=accelerator.device)).tolist())
    if most > batches and not batches:
        raise UserError("under FSDP every process needs at least one evaluation batch: lower eval_batch_size or "
                        "use fewer processes")
    return most - batches


def scale_gradients(model, factor):
    """Multiply every gradient of `model` by `factor` (a tensor of one element), in place, with one
    kernel per device and dtype. The gradients are local tensors under DDP and the local shards of
    DTensors under FSDP: a scale by one number is right for both."""
    grads = {}
    for p in model.parameters():
        if p.grad is not None:
            grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for (device, dtype), group in grads.items():
        torch._foreach_mul_(group, factor.to(device=device, dtype=dtype))


def update_ema(accelerator, ema, model):
    """Average the model's weights after an optimizer step into `ema` (an `AveragedModel` of the
    recipe's module, built before `prepare`): from the unwrapped module, whose parameters under DDP
    are whole on every rank."""
    ema.update_parameters(accelerator.unwrap_model(model))
