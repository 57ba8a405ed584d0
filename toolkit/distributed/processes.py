"""The run's processes: the process group and its device (CPU or GPU), the strategy that the
launch asks for, what a failed peer looks like, and the peak FLOP/s of the GPUs that a model FLOPs
utilisation is measured against."""

import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType, parse_flag_from_env

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
    strategy = asked_strategy()
    refuse_a_dropped_strategy(strategy)
    refuse_fsdp_activation_checkpointing(strategy)
    refuse_model_parallelism()
    if strategy == "DeepSpeed":
        refuse_for_deepspeed(cfg)
    if strategy and not torch.cuda.is_available() and "WORLD_SIZE" in os.environ:
        cpu = True  # gloo on the CPU, whatever the launch's config says of GPUs
    processes = PartialState(cpu=cpu, **group_timeout(cfg))
    if cpu and strategy == "FSDP":
        # AcceleratorState picks FSDP for GPU-like process groups only; on CPUs it would wrap DDP.
        processes.distributed_type = DistributedType.MULTI_GPU
    if cpu and strategy == "DeepSpeed":
        import deepspeed.ops

        # DeepSpeed's collectives stay on the group's gloo: its shared-memory op for CPUs would be
        # compiled with a C++ compiler at the first run (a minute, and an error without one).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    quiet_libraries(processes.is_main_process)
    if precision_of(cfg) == "fp16" and processes.device.type == "cpu":
        raise UserError("precision=fp16 needs a GPU (on the CPU it would silently train in fp32); "
                        "use precision=bf16 or precision=no")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    return processes, cpu


def precision_of(cfg):
    """The run's mixed precision: the key, or what `accelerate launch` / `accelerate config` set."""
    return cfg.precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


WATCHDOG_REPORT_MINUTES = 5  # a hung process's watchdog writes its stacks and waits for the others' within this


def group_timeout(cfg):
    """The process group's timeout, after which a collective that waits for a hung process fails:
    longer than watchdog_minutes, so that the watchdog says first where each process was (NCCL's
    default, 10 minutes, would end the run before the default watchdog of 30 could). Off, the
    backend's default."""
    if not cfg.watchdog_minutes:
        return {}
    return {"timeout": datetime.timedelta(minutes=cfg.watchdog_minutes + WATCHDOG_REPORT_MINUTES)}


def asked_strategy():
    """"FSDP" or "DeepSpeed" where the launch asks for one (`accelerate launch` with fsdp.yaml or
    deepspeed.yaml sets ACCELERATE_USE_FSDP or ACCELERATE_USE_DEEPSPEED), else None."""
    return next((name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if parse_flag_from_env(flag)), None)


def keeps_memory_format():
    """Whether the strategy takes parameters in any memory format (channels_last): FSDP2 shards,
    and DeepSpeed flattens, contiguous parameters only, so under them channels_last is off."""
    return asked_strategy() is None


def refuse_for_deepspeed(cfg):
    """What the loop cannot do where DeepSpeed takes the optimizer step inside backward."""
    if cfg.skip_nonfinite:
        raise UserError("skip_nonfinite=true needs the step's gradients before the optimizer step, which DeepSpeed "
                        "takes inside backward: leave it out under DeepSpeed (fp16's loss scaler skips overflowing "
                        "steps itself), or use FSDP")
    if cfg.auto_batch_size:
        raise UserError("auto_batch_size=true: DeepSpeed fixes its engine's micro-batch size once per process, when "
                        "the first engine starts, so the sizes cannot be tried; set batch_size and grad_accum (an "
                        "out-of-memory step's error says which), or use FSDP")
    if cfg.loss_per and cfg.grad_accum > 1:
        raise UserError(f"loss_per={cfg.loss_per} with grad_accum={cfg.grad_accum}: under DeepSpeed the step's "
                        f"gradients cannot be weighed by the units of all its micro-batches (DeepSpeed steps inside "
                        f"backward); use grad_accum=1 with a larger batch_size, or FSDP")


def refuse_a_dropped_strategy(strategy):
    """FSDP or DeepSpeed asked for together with ACCELERATE_USE_CPU=1 (`--cpu`), with which
    Accelerate trains DDP instead, silently."""
    if strategy and parse_flag_from_env("ACCELERATE_USE_CPU"):
        raise UserError(f"the launch asks for {strategy} and for the CPU (ACCELERATE_USE_CPU=1 or --cpu), with which "
                        f"Accelerate drops {strategy} and trains DDP: leave out ACCELERATE_USE_CPU (on a machine "
                        f"without GPUs the {strategy} config runs its processes on the CPU)")


def refuse_fsdp_activation_checkpointing(strategy):
    """The FSDP config's own activation checkpointing, which recomputes with new random draws."""
    if strategy == "FSDP" and parse_flag_from_env("FSDP_ACTIVATION_CHECKPOINTING"):
        raise UserError("the FSDP config sets fsdp_activation_checkpointing, whose recompute draws new dropout masks "
                        "(Accelerate passes preserve_rng_state=False), so gradients would not be those of the loss: "
                        "set it to false and use activation_checkpointing=true, which recomputes the same draws")


# Accelerate's ParallelismConfig sizes (accelerate launch --parallelism_config_*) that split each
# layer's computation over processes: what they are called in the launch's variables.
MODEL_PARALLEL = {"TP_SIZE": "tensor parallel", "CP_SIZE": "context parallel", "SP_SIZE": "sequence parallel"}


def refuse_model_parallelism():
    """Tensor, context or sequence parallelism from the launch's parallelism config, refused: a
    tensor-parallel model's save_state resumes every rank with rank 0's shard of each split layer
    (Accelerate 1.16), and context and sequence parallelism are untested."""
    if not parse_flag_from_env("ACCELERATE_USE_PARALLELISM_CONFIG"):
        return
    for size, name in MODEL_PARALLEL.items():
        value = os.environ.get(f"PARALLELISM_CONFIG_{size}", "1")
        if value not in ("", "1"):
            raise UserError(f"the launch asks for {name} (parallelism_config_{size.lower()}: {value}), which the "
                            f"toolkit does not run (its resume and exact metrics hold for DDP, FSDP2 and DeepSpeed "
                            f"ZeRO): shard the model with accelerate_configs/fsdp.yaml or deepspeed.yaml instead")


COLLECTIVES = ("barrier", "monitored_barrier", "all_reduce", "reduce", "broadcast", "all_gather", "all_gather_object",
               "gather", "gather_object", "scatter", "broadcast_object_list", "all_to_all", "reduce_scatter")


def recipe_datasets(recipe, cfg, processes):
    """The recipe's splits on this process: datasets() on the main process first (it downloads
    alone; the others then read its files), or with `datasets_together` on every process at once.
    A collective that datasets() calls while the main process runs it alone would pair with the
    others' wait for it and run them into datasets() too early: it is refused in one line."""
    if cfg.datasets_together or processes.num_processes == 1:
        return recipe.datasets(cfg)
    with processes.main_process_first():
        if not processes.is_main_process:
            return recipe.datasets(cfg)
        saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name in saved:
            setattr(dist, name, _refused(name))
        try:
            return recipe.datasets(cfg)
        finally:
            for name, collective in saved.items():
                setattr(dist, name, collective)


def _refused(name):
    def collective(*args, **kwargs):
        raise UserError(f"the recipe's datasets() calls torch.distributed.{name} while the main process runs it "
                        f"alone (first, so that it downloads alone): a library that coordinates its processes "
                        f"itself (MosaicML's StreamingDataset) needs datasets_together=true, which runs datasets() "
                        f"on every process at once")
    return collective


def quiet_libraries(is_main):
    """On every process but the main one, Python's warnings (a library's FutureWarning), the
    progress bars of HF `datasets` (a recipe's `.map`) and of the hub (transformers' "Loading
    weights"), and `transformers`' warnings and load reports are off: the main process shows each
    once. The variables reach a library imported later; the calls, one imported already. Errors
    still show on every process."""
    if is_main:
        return
    warnings.simplefilter("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"  # and in the DataLoader's workers
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
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
