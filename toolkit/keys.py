"""Every config key the toolkit reads, each with its facts written once (`toolkit.spec.Key`): its
default, meaning, allowed values, minimum, rule of its own and whether a resume may change it.
`toolkit.config` checks configs against them and makes the README's table from them; a tracker's
block (wandb.*) comes with its entry in `toolkit.tracking`."""

import importlib
import re

from toolkit import spec, tracking
from toolkit.spec import Group, Key


def _registry(module, table):
    """The names in a registry (e.g. toolkit.optim's OPTIMIZERS), looked up when a config is checked:
    its module imports torch, which reading a config does not need."""
    return lambda: importlib.import_module(module).__dict__[table]


def _monitor(value):
    if value and not re.fullmatch(r"val(_ema)?/\S+", str(value)):
        return f"{value!r} must name a validation metric, e.g. val/loss or val_ema/accuracy, or be empty"
    return None


def _lr_mults(value):
    return "; ".join(f"{prefix}: expected a number >= 0, got {mult!r}" for prefix, mult in value.items()
                     if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult < 0) or None


# Every key the toolkit reads, with its facts (toolkit.spec); the checks, the resume rules and the
# README's table are made from them.
KEYS = {
    "seed": Key(0, "seeds python/numpy/torch; rank r draws its randomness from seed + r"),
    "deterministic": Key(False, "torch.use_deterministic_algorithms: bitwise repeatable on GPU, slower"),
    "epochs": Key(10, "passes over the training split", resumable=True),
    "max_steps": Key(0, "stop after this many optimizer steps, even mid-epoch (0: no limit)", resumable=True),
    "max_minutes": Key(0.0, "stop after this much training time, even mid-epoch (0: no limit)", resumable=True),
    "batch_size": Key(64, "per process and micro-batch", minimum=1),
    "grad_accum": Key(1, "micro-batches per optimizer step; global batch = batch_size x grad_accum x processes",
                      minimum=1),
    "loss_per": Key("", 'the loss is a mean over this count of loss() (e.g. tokens), normalised per step ("": '
                        'samples)'),
    "eval_batch_size": Key(256, "per process, for val/test (no gradients, so larger is cheaper)", minimum=1,
                           resumable=True),
    "num_workers": Key(0, "DataLoader workers; 0 is fastest for in-memory datasets", resumable=True),
    "optim": Group({
        "name": Key("adamw", choices=_registry("toolkit.optim", "OPTIMIZERS")),
        "lr": Key(1e-3, "base learning rate (times the schedule's factor)"),
        "weight_decay": Key(0.0, "applied to matrices and kernels only, not to biases or norm weights"),
        "betas": Key([0.9, 0.999], "adam and adamw"),
        "momentum": Key(0.9, "sgd"),
        "lr_mult": Key({}, "LR multiplier per module prefix, e.g. optim.lr_mult.features=0.1", check=_lr_mults),
    }),
    "freeze": Key([], "parameter-name prefixes not to train, e.g. [features]"),
    "sched": Group({
        "name": Key("constant", choices=_registry("toolkit.optim", "SCHEDULES")),
        "warmup_steps": Key(0, "linear warmup from 0, in optimizer steps"),
        "warmup_epochs": Key(0.0, "the same in epochs, when warmup_steps is 0"),
        "min_lr": Key(0.0, "cosine and linear end at min_lr x lr"),
        "step_epochs": Key(1.0, "step: multiply the LR by gamma every step_epochs epochs"),
        "gamma": Key(0.1, "step: the factor"),
    }),
    "clip_grad_norm": Key(0.0, "clip the global gradient norm to this (0: off); the norm is logged either way"),
    "skip_nonfinite": Key(False, "skip steps whose loss or gradient norm is NaN/inf on any rank (1 host sync per "
                                 "step)", resumable=True),
    "nan_tolerance": Key(3, "with skip_nonfinite: stop when more than this many steps in a row were skipped",
                         resumable=True),
    "ema": Group({
        "decay": Key(0.0, "keep an exponential moving average of the weights, e.g. 0.999 (0: off)",
                     check=lambda v: None if v < 1 else "must be below 1 (e.g. 0.999), or 0 for no EMA"),
    }),
    "val_every": Key(1, "validate every N epochs (0: only when training ends)", resumable=True),
    "val_every_steps": Key(0, "also every N optimizer steps (0: off)", resumable=True),
    "sanity_val_batches": Key(2, "val batches evaluated before the first step: a bad monitor or loss fails in "
                                 "seconds", resumable=True),
    "early_stop": Group({
        "patience": Key(0, "stop after N validations without a better checkpoint.monitor (0: off)", resumable=True),
    }),
    "limit_batches": Group({
        "train": Key(0),
        "val": Key(0),
        "test": Key(0),
    }, "use only the first N batches of a split (0: all), e.g. to debug"),
    "debug": Group({
        "overfit_batches": Key(0, "train on N batches, repeated to fill each epoch, and validate on them (a model "
                                  "reaches ~100%)"),
        "fast_run": Key(False, "one train, val and test step, a checkpoint saved and loaded, then exit"),
    }),
    "precision": Key(None, "bf16/fp16 on GPUs; null: what `accelerate launch`/`accelerate config` set (no)",
                     choices=("no", "bf16", "fp16")),
    "channels_last": Key(False, "store conv weights NHWC: faster convolutions on GPUs, with bf16/fp16 above all"),
    "compile": Key(False, "torch.compile the model: faster GPU steps after a compile of seconds to minutes",
                   resumable=True),
    "watchdog_minutes": Key(30.0, "a process without a step, evaluation batch or save for this long is hung: its "
                                  "stacks go to <run>/hang-rank<r>.txt and the run ends (0: off)", resumable=True),
    "log_every": Key(50, "optimizer steps between reads of the train metrics (host syncs)", minimum=1,
                     resumable=True),
    "profile": Group({
        "wait": Key(5, "optimizer steps of the session before profiling starts"),
        "warmup": Key(1, "steps the profiler runs but does not record (its own start-up)"),
        "active": Key(0, "steps recorded by torch.profiler into <run>/profile/ (TensorBoard, Perfetto), its top "
                         "operators into log.txt (0: off)"),
    }, resumable=True),
    "checkpoint": Group({
        "every_epochs": Key(1, "save at the end of every N epochs (0: not on a schedule)", resumable=True),
        "every_steps": Key(0, "also save every N optimizer steps, mid-epoch too (0: off)", resumable=True),
        "keep": Key(3, "newest checkpoints kept (0: all); the best one is always kept", resumable=True),
        "monitor": Key("val/loss", 'the metric that picks the best checkpoint: val/<metric> or val_ema/<metric> '
                                   '("": none)', check=_monitor),
        "mode": Key("min", "which way is better for the monitor", choices=("min", "max")),
    }),
    "init_from": Key("", "start from these weights: a .safetensors/.pt file, a run or HF folder, an HF hub id"),
    "trackers": Key(["tensorboard"], "besides metrics.jsonl, which is always written; [] for none",
                    choices=lambda: tracking.TRACKERS, resumable=True),
    # Each tracker's block (wandb.*), declared with its entry in toolkit.tracking.
    **{name: Group(entry.keys, entry.meaning, resumable=True) for name, entry in tracking.TRACKERS.items()
       if entry.keys},
    "notify": Group({
        "email": Key("", 'e-mail the result to this address when the run ends or fails ("": no)'),
        "smtp_host": Key("localhost"),
        "smtp_port": Key(25),
        "smtp_starttls": Key(False, "true for most mail providers (with smtp_port=587)"),
        "smtp_user": Key("", "log in as this user; the password only from $SMTP_PASSWORD, never the config"),
        "sender": Key("", 'From: ("": minloop@<host>)'),
        "webhook": Key("", 'also POST {"text": ...} to this URL (Slack/Mattermost incoming webhook)'),
    }, resumable=True),
    "output_dir": Key("runs", "runs go to <output_dir>/<recipe>/<YYYYmmdd-HHMMSS>[-<name>]"),
    "name": Key("", "optional suffix of the run folder name"),
}
DEFAULTS = spec.defaults(KEYS)
# Keys that recipes define (lenet's data.root) and that a resume may change: where the data is.
RECIPE_RESUMABLE = ("data.root", "data.download")


def resumable(key):
    """Whether a resumed run may change `key` (a dotted name): it changes neither the model, the data
    nor the results so far."""
    if key in RECIPE_RESUMABLE:
        return True
    node, parts = Group(KEYS), key.split(".")
    for part in parts:
        if not isinstance(node, Group) or part not in node.keys:
            return False
        node = node.keys[part]
        if isinstance(node, Group) and node.resumable:
            return True
    return isinstance(node, Key) and node.resumable
