"""Where the strategies differ in the loop, as plain functions: Accelerator's options
(`accelerator_options`), what the log says of the strategy (`describe`), what its errors mean
(`explain`), which model an evaluation runs (`evaluation_model`), how many forwards a rank runs to
match the others (`lockstep`), the recipe's own module and its whole state dict (`recipe_model`,
`whole_state_dict`), the gradients' weighing (`scale_gradients`, `steps_in_backward`), their norm
(`clip_gradients`) and the EMA's update (`update_ema`)."""

import math

import torch
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DataParallel, DistributedDataParallel

from toolkit import UserError
from toolkit.distributed.processes import asked_strategy


def kind(accelerator):
    """The strategy that Accelerate prepared: "FSDP2", "DeepSpeed", "DDP", or None (one process)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return "FSDP2" if accelerator.is_fsdp2 else "FSDP"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "DeepSpeed"
    return "DDP" if accelerator.num_processes > 1 else None


def zero_stage(accelerator):
    return accelerator.state.deepspeed_plugin.zero_stage


def sharded(accelerator):
    """Whether the model's parameters are split over the processes (FSDP, ZeRO-3): then every
    forward gathers them, a collective that every rank must run."""
    strategy = kind(accelerator)
    return strategy in ("FSDP", "FSDP2") or (strategy == "DeepSpeed" and zero_stage(accelerator) == 3)


def steps_in_backward(accelerator):
    """Whether the optimizer step happens inside `accelerator.backward` of a step's last
    micro-batch (DeepSpeed's engine steps there), not at `optimizer.step()`."""
    return kind(accelerator) == "DeepSpeed"


def accelerator_options(cfg, cpu):
    """Accelerator's arguments that the strategy and the config set: DDP's options (ddp.*), which
    Accelerate uses only where it wraps the model in DDP, and DeepSpeed's plugin, told the run's
    clip_grad_norm (Accelerate's default would clip at 1.0) and micro-batch size."""
    options = {"cpu": cpu, "kwargs_handlers": [DistributedDataParallelKwargs(
        find_unused_parameters=cfg.ddp.find_unused_parameters, static_graph=cfg.ddp.static_graph,
        gradient_as_bucket_view=cfg.ddp.gradient_as_bucket_view)]}
    if asked_strategy() == "DeepSpeed":
        from accelerate.utils import DeepSpeedPlugin

        # The weights gathered whole for model.safetensors under ZeRO-3 (else get_state_dict refuses).
        plugin = DeepSpeedPlugin(gradient_clipping=float(cfg.clip_grad_norm), zero3_save_16bit_model=True)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        options.update(deepspeed_plugin=plugin, cpu=False)  # cpu=True would make Accelerate drop it
    return options


def finish_prepare(accelerator, model):
    """What `accelerator.prepare(model)` leaves to do for the strategy: DeepSpeed's engine casts
    the weights to bf16 or fp16 but not the inputs, so the recipe's module runs under autocast
    (as Accelerate's mixed precision runs it under DDP and FSDP)."""
    precision = accelerator.mixed_precision
    if steps_in_backward(accelerator) and precision in ("bf16", "fp16"):
        net = recipe_model(accelerator, model)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        net.forward = torch.autocast(accelerator.device.type, dtype=dtype)(net.forward)


def saves_one_file(accelerator):
    """Whether Accelerate's save_state writes the model as one state dict (one process, DDP), rather
    than the strategy its own files (FSDP's, DeepSpeed's)."""
    return kind(accelerator) in (None, "DDP")


def numel(parameter):
    """The parameter's number of elements in the whole model (ZeRO-3 leaves an empty tensor in
    each process; a DTensor counts the whole)."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def describe(accelerator):
    """The strategy in the log's words: `1 process`, `DDP, 2 processes (parameters copied)`,
    `FSDP2, 2 processes (parameters sharded)` or `DeepSpeed ZeRO-2, 2 processes (optimizer
    state and gradients sharded)`."""
    n, strategy = accelerator.num_processes, kind(accelerator)
    processes = f"{n} process" + ("es" if n > 1 else "")
    if strategy is None:
        return processes
    if strategy == "DeepSpeed":
        stage = zero_stage(accelerator)
        split = ["parameters copied", "optimizer state sharded", "optimizer state and gradients sharded",
                 "parameters, gradients and optimizer state sharded"][stage]
        return f"DeepSpeed ZeRO-{stage}, {processes} ({split})"
    return f"{strategy}, {processes} (parameters {'sharded' if sharded(accelerator) else 'copied'})"


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
    """The module the recipe built, inside what `prepare` wrapped it in (DDP, DeepSpeed's engine):
    for reading it (its parameters, its FLOPs), not for a forward that must be distributed. Under
    FSDP2 it is the prepared model itself, whose parameters are shards."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model)
    # Accelerate's unwrap_model imports deepspeed wherever it is installed, to test for its engine:
    # a second of start-up (it imports mlflow) in every process of every run.
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def whole_state_dict(accelerator, model):
    """The recipe's module's state dict, with its own keys, gathered where it is sharded (on every
    rank: call it on all)."""
    if sharded(accelerator) or kind(accelerator) == "DeepSpeed":
        return accelerator.get_state_dict(model)
    return recipe_model(accelerator, model).state_dict()  # as Accelerate, without its import of deepspeed


def evaluation_model(accelerator, model):
    """The model an evaluation runs. Copied (DDP, ZeRO-1 and 2), the unwrapped module: its forward
    runs no collective, so ranks may run different numbers of batches, and each takes rank 0's
    buffers (BatchNorm statistics drift apart between DDP's broadcasts), so that every rank
    evaluates the same model. Sharded, the prepared model itself: its forward gathers the weights."""
    if sharded(accelerator):
        return model
    net = recipe_model(accelerator, model)
    if accelerator.num_processes > 1:
        for buffer in net.buffers():
            broadcast(buffer, from_process=0)
    return net


def lockstep(accelerator, batches):
    """This rank's evaluation batches as (batch, counted) pairs. Copied, its own batches. Sharded,
    where each forward gathers the weights (a collective of every rank), the ranks agree before
    each forward whether any still has a batch (one all-reduce), and one that has run out repeats
    its last batch, not counted, until none has one: ranks may hold different numbers of batches
    (a stream, an odd number of batches)."""
    if not sharded(accelerator):
        yield from ((batch, True) for batch in batches)
        return
    batches, last = iter(batches), None
    while True:
        batch = next(batches, _END)
        mine = [batch is not _END, batch is _END and last is None]  # has a batch; has none to repeat
        has, lacks = accelerator.reduce(torch.tensor(mine, device=accelerator.device).int()).tolist()
        if not has:
            return
        if lacks:  # on every rank alike, so that all stop here together
            raise UserError("with sharded parameters every process needs at least one evaluation batch, and the "
                            "split has fewer samples than processes (or a stream gave some none): use fewer "
                            "processes")
        if batch is not _END:
            last = batch
        yield last, batch is not _END


_END = object()


def scale_gradients(model, factor):
    """Multiply every gradient of `model` by `factor` (a tensor of one element), in place, with one
    kernel per device and dtype. The gradients are local tensors under DDP and the shards of
    DTensors under FSDP2 (scaled where they are, never gathered)."""
    grads = {}
    for p in model.parameters():
        if p.grad is not None:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grads.setdefault((grad.device, grad.dtype), []).append(grad)
    for (device, dtype), group in grads.items():
        torch._foreach_mul_(group, factor.to(device=device, dtype=dtype))


def clip_gradients(accelerator, model, max_norm):
    """Clip the step's gradients to `max_norm` (math.inf: measure only); their norm, a tensor on
    the device. DeepSpeed clips inside its step (its config's gradient_clipping, set from
    clip_grad_norm) and reports the norm it measured."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    if steps_in_backward(accelerator):
        return torch.tensor(math.nan if norm is None else float(norm), device=accelerator.device)
    return _whole(norm)


def update_ema(accelerator, ema, model):
    """Average the model's weights after an optimizer step into `ema` (an `AveragedModel` of the
    recipe's module, built before `prepare`, whole and in its dtypes on every rank): from the
    unwrapped module, whose parameters are whole under DDP and ZeRO-1 and 2 and gathered where
    they are sharded (DTensors, ZeRO-3), cast where DeepSpeed keeps them in bf16 or fp16."""
    net = recipe_model(accelerator, model)
    if kind(accelerator) == "DeepSpeed" and zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(net.parameters())):
            ema.update_parameters(_Whole(net, ema.module))
    else:
        ema.update_parameters(_Whole(net, ema.module))


class _Whole:
    """A module's parameters and buffers as AveragedModel reads them: whole (a DTensor gathered)
    and in the dtypes of the average's own."""

    def __init__(self, net, average):
        self.net, self.average = net, average

    def parameters(self):
        return [_whole(p).to(mine.dtype) for p, mine in zip(self.net.parameters(), self.average.parameters())]

    def buffers(self):
        return [_whole(b).to(mine.dtype) for b, mine in zip(self.net.buffers(), self.average.buffers())]


def _whole(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
