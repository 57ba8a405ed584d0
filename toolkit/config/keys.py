"""Every config key the toolkit reads, each with its facts written once (`toolkit.config.spec.Key`): its
default, meaning, allowed values, minimum, rule of its own and whether a resume may change it.
`toolkit.config` checks configs against them and makes docs/config.md's table from them. A tracker's
block (wandb.*) is here with the other keys; its entry in `toolkit.run.trackers.TRACKERS` makes it.
Nothing here imports the run: the registries' names (optimizers, schedules, trackers) are looked up
when a config is checked."""

import importlib
import re

from toolkit.config import spec
from toolkit.config.spec import Group, Key


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


# Every key the toolkit reads, with its facts (toolkit.config.spec); the checks, the resume rules and the
# table of keys are made from them.
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
    "eval_batch_size": Key(256, "per process, for val/test (no gradients, so larger is cheaper); smaller where a "
                           "split would leave a process without a batch", minimum=1, resumable=True),
    "auto_batch_size": Key(False, "before training, halve batch_size and double grad_accum (the same global batch) "
                           "while the first step runs out of memory, and halve eval_batch_size likewise; "
                           "config.yaml records the sizes found", resumable=True),
    "num_workers": Key(0, "DataLoader workers; 0 is fastest for in-memory datasets", resumable=True),
    "datasets_together": Key(False, "every process runs datasets() at once, as a library that coordinates its "
                             "processes needs (MosaicML streaming); false: the main process first (it downloads "
                             "alone), then the others", resumable=True),
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
        "gamma": Key(0.1, "step: the factor; exponential: the LR's factor at the end of training"),
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
    "activation_checkpointing": Key(False, "recompute each block's activations in backward instead of keeping them: "
                                           "less memory for a third more compute, the same numbers (dropout too)",
                                    resumable=True),
    "ddp": Group({
        "find_unused_parameters": Key(False, "for a model whose loss() leaves some parameters without a gradient in "
                                             "a step (slower: DDP looks for them every step)"),
        "static_graph": Key(False, "the model uses the same parameters in every step: DDP can overlap more"),
        "gradient_as_bucket_view": Key(False, "gradients share DDP's all-reduce buffers: less memory"),
    }, "DDP's options, where several processes each hold the whole model", resumable=True),
    "watchdog_minutes": Key(30.0, "a process without a step, evaluation batch or save for this long is hung: its "
                                  "stacks go to <run>/hang-rank<r>.txt and the run ends (0: off); the process "
                                  "group's timeout is 5 minutes longer", resumable=True),
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
                    choices=_registry("toolkit.run.trackers", "TRACKERS"), resumable=True),
    # Each tracker's block (toolkit/run/trackers.py makes the trackers), read as the tracker starts.
    "wandb": Group({
        "project": Key("", 'the wandb project ("": $WANDB_PROJECT, else minloop); runs are named after their folder'),
        "entity": Key("", 'team or user ("": $WANDB_ENTITY, else yours); the key: `wandb login` or $WANDB_API_KEY'),
        "mode": Key("", 'offline needs no account ("": $WANDB_MODE, else online)',
                    choices=("", "online", "offline", "disabled")),
        "dir": Key("", 'wandb writes into <dir>/wandb ("": $WANDB_DIR, else the run folder)'),
        "group": Key("", 'e.g. a sweep\'s name ("": $WANDB_RUN_GROUP)'),
    }, '"": what the WANDB_* variable says, else the default in brackets', resumable=True),
    "mlflow": Group({
        "tracking_uri": Key("", 'a server (http://...), sqlite:///mlflow.db or file:<folder> ("": '
                                "$MLFLOW_TRACKING_URI, else MLflow's default)"),
        "experiment": Key("", 'the experiment ("": $MLFLOW_EXPERIMENT_NAME, else minloop; where set, the variable '
                              'wins); runs are named after their folder'),
    }, resumable=True),
    "aim": Group({
        "repo": Key("", 'the Aim repo ("": output_dir); `aim up --repo <repo>` shows its runs'),
        "experiment": Key("minloop", "the experiment; runs are named after their folder"),
    }, resumable=True),
    "comet_ml": Group({
        "project": Key("", 'the Comet project ("": $COMET_PROJECT_NAME, else minloop); runs are named after their '
                           "folder"),
        "workspace": Key("", 'the workspace ("": $COMET_WORKSPACE, else yours); the key: `comet login` or '
                             "$COMET_API_KEY"),
        "mode": Key("", 'offline needs no account and writes <run>/comet_ml ("": $COMET_START_ONLINE, else online)',
                    choices=("", "online", "offline")),
    }, resumable=True),
    "clearml": Group({
        "project": Key("", 'the ClearML project ("": $CLEARML_PROJECT, else minloop); tasks are named after their '
                           "folder ($CLEARML_TASK wins); the server: clearml.conf or $CLEARML_API_*; "
                           "$CLEARML_OFFLINE_MODE=1: none"),
    }, resumable=True),
    "dvclive": Group({
        "dir": Key("", 'DVCLive\'s folder ("": <run>/dvclive)'),
    }, resumable=True),
    "swanlab": Group({
        "project": Key("", 'the SwanLab project ("": $SWANLAB_PROJ_NAME, else minloop); runs are named after their '
                           "folder"),
        "workspace": Key("", 'the workspace ("": $SWANLAB_WORKSPACE, else yours); the key: `swanlab login` or '
                             "$SWANLAB_API_KEY"),
        "mode": Key("", 'local and offline need no account ("": $SWANLAB_MODE, else online)',
                    choices=("", "online", "local", "offline", "disabled")),
        "group": Key("", "e.g. a sweep's name"),
    }, resumable=True),
    "trackio": Group({
        "project": Key("minloop", "the Trackio project; runs are named after their folder"),
        "space_id": Key("", 'a Hugging Face Space to log to ("": $TRACKIO_SPACE_ID, else local, in $TRACKIO_DIR)'),
        "group": Key("", "e.g. a sweep's name"),
    }, resumable=True),
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
