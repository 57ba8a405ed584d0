"""Fitting the device's memory: `auto_batch_size`, which finds the micro-batch that fits before a
run starts (the one line that an out-of-memory step ends in is the run's records').

auto_batch_size keeps the optimisation as configured: it trades micro-batch size for gradient
accumulation, so the global batch (batch_size x grad_accum x processes) stays what the config says
and the run trains as one started at the size it settles on. HF Trainer's auto_find_batch_size
halves the global batch instead, which changes the optimisation (and the LR it wants).
"""

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from accelerate.utils.memory import clear_device_cache

from toolkit import UserError, distributed
from toolkit.build import build
from toolkit.data.loaders import make_loader
from toolkit.optim import make_optimizer
from toolkit.run.records import is_out_of_memory, smaller_batch


def fit_batch_sizes(recipe, cfg, processes, cpu):
    """auto_batch_size=true: the config with the largest batch_size (halved from the config's, with
    grad_accum doubled: the same global batch) whose first training step fits, and the largest
    eval_batch_size (halved likewise) whose first evaluation batch fits; with a line for the log
    that says what changed, or None when the config's sizes fit.

    Each size is tried on a model, optimizer and data built as the run builds them (its forward,
    backward and optimizer step on the first batch, in the run's strategy and precision), thrown
    away after: the run then starts from its first step with the sizes found, exactly as a run
    configured with them would. Every process tries the same sizes, and one all-reduce per try
    makes them agree: a size that runs out of memory in one process is too large for all."""
    asked = cfg
    while True:
        with Trial(recipe, cfg, processes, cpu) as trial:
            fits = trial.train_step_fits()
            while fits and not trial.evaluation_fits(cfg):
                if cfg.eval_batch_size == 1:
                    raise UserError("auto_batch_size: evaluation runs out of memory even at eval_batch_size=1")
                cfg = cfg.replace(eval_batch_size=cfg.eval_batch_size // 2)
        if fits:
            break
        if cfg.batch_size == 1:
            raise UserError("auto_batch_size: the first training step runs out of memory even at batch_size=1; "
                            "try activation_checkpointing=true, a lower precision, or a launch config that shards "
                            "the model over the processes")
        smaller = smaller_batch(cfg.batch_size)
        cfg = cfg.replace(batch_size=smaller, grad_accum=cfg.grad_accum * cfg.batch_size // smaller)
    changed = [f"{key}={cfg[key]}" for key in ("batch_size", "grad_accum", "eval_batch_size") if cfg[key] != asked[key]]
    if not changed:
        return cfg, None
    return cfg, (f"auto_batch_size: batch_size={asked.batch_size} grad_accum={asked.grad_accum} eval_batch_size="
                 f"{asked.eval_batch_size} ran out of memory; the run takes {' '.join(changed)} (the same global "
                 f"batch of {cfg.batch_size * cfg.grad_accum} samples per process), recorded in its config.yaml")


class Trial:
    """A model, optimizer and data built as the run builds them, on which sizes are tried; `with`
    it, they are thrown away after."""

    def __init__(self, recipe, cfg, processes, cpu):
        self.recipe, self.cfg, self.processes = recipe, cfg, processes
        self.splits, model, self.ema, _ = build(recipe, cfg, processes)  # the EMA copy: held, as the run holds it
        optimizer, _ = make_optimizer(cfg, model, recipe)
        self.accelerator = Accelerator(mixed_precision=cfg.precision, **distributed.accelerator_options(cfg, cpu))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        distributed.finish_prepare(self.accelerator, self.model)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.accelerator.free_memory()  # forgets the prepared model and optimizer
        self.model = self.optimizer = self.ema = self.splits = None
        clear_device_cache(garbage_collection=True)  # free_memory collected while it still held them

    def train_step_fits(self):
        """Whether a forward, backward and optimizer step of the first training batch fit, in
        every process. Gradients are not synchronised (no collective that a process which ran out
        could leave waiting), and the weights this changes are thrown away."""
        accelerator, model = self.accelerator, self.model
        batch = self._first_batch("train", self.cfg)

        def step():
            model.train()
            with accelerator.no_sync(model):
                loss, _ = self.recipe.loss(model, batch, self.cfg)
                accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return self._fits(step)

    def evaluation_fits(self, cfg):
        """Whether the model's forward of the first evaluation batch (val's, else test's) fits at
        cfg.eval_batch_size, in every process (True where there is no evaluation)."""
        split = next((split for split in ("val", "test") if split in self.splits), None)
        if split is None:
            return True
        batch = self._first_batch(split, cfg)

        @torch.no_grad()
        def forward():
            net = distributed.evaluation_model(self.accelerator, self.model)
            net.eval()
            with self.accelerator.autocast():
                self.recipe.loss(net, batch, cfg)
        return self._fits(forward)

    def _first_batch(self, split, cfg):
        loader = make_loader(split, self.splits[split], cfg, self.recipe, self.processes, num_workers=0)
        return send_to_device(next(iter(loader)), self.accelerator.device)

    def _fits(self, work):
        ran_out = False
        try:
            work()
        except Exception as error:  # noqa: B902: which errors are memory is the library's call
            if not is_out_of_memory(error):
                raise
            ran_out = True
        clear_device_cache(garbage_collection=True)
        flag = torch.tensor(float(ran_out), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")  # the one collective: every process agrees
        return flag.item() == 0
