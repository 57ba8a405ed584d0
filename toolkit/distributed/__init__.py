"""The run's processes and what the distributed strategy changes, as plain functions, in the one
room that names a strategy (DDP, FSDP2, DeepSpeed ZeRO):

    processes.py   the process group and its device (CPU or GPU), the strategy the launch asks
                   for, what a failed peer looks like, the GPUs' peak FLOP/s
    strategy.py    where the strategies differ in the loop: Accelerator's options, the log's
                   banner, errors, the models that evaluation and the EMA read, the gradients
    shards.py      sharded checkpoints: whole weights read in one process, pickles checked first

On a machine without GPUs, Accelerate trains DDP where FSDP or DeepSpeed is asked for: it picks
FSDP only for GPU-like process groups, and DeepSpeed only where it is not told `cpu`. So that a
large-model config is proven on CPU processes before the GPU job, `start_processes` starts the
group on the CPU (gloo) and then lets Accelerate pick the strategy: FSDP2 shards over gloo, and
DeepSpeed runs its CPU accelerator. Only there: a GPU machine takes Accelerate's own path.
"""

from toolkit.distributed.processes import (WATCHDOG_REPORT_MINUTES, asked_strategy, first_line,  # noqa: F401
                                           group_timeout, keeps_memory_format, lost_a_peer, peak_flops_per_s,
                                           precision_of, quiet_libraries, recipe_datasets, refuse_a_dropped_strategy,
                                           refuse_for_deepspeed, start_processes)
from toolkit.distributed.shards import (SCRIPTS, check_pickles, full_weights, refuse_a_foreign_checkpoint,  # noqa: F401
                                        written_by)
from toolkit.distributed.strategy import (accelerator_options, clip_gradients, describe, evaluation_model,  # noqa: F401
                                          explain, finish_prepare, kind, lockstep, numel, recipe_model,
                                          saves_one_file, scale_gradients, sharded, steps_in_backward, update_ema,
                                          whole_state_dict, zero_stage)
