"""profile.*: a window of training steps recorded by torch.profiler.

After `profile.wait` optimizer steps (counted from the session's start, so a resumed run can be
profiled too) and `profile.warmup` steps that the profiler runs but throws away (its own start-up),
`profile.active` steps are recorded. Each process writes its trace into <run>/profile/ as Chrome
trace JSON (`rank<r>.<time>.pt.trace.json`), which TensorBoard's profiler plugin (`tensorboard
--logdir <run>/profile`) and Perfetto (ui.perfetto.dev) open; log.txt gets the main process's ten
most expensive operators. With profile.active=0 (the default) nothing is started: the loop tests
one variable per step.
"""

import contextlib

import torch

from toolkit.run.logs import FILE_ONLY, log

TOP = 10  # operators in log.txt's table


@contextlib.contextmanager
def window(cfg, run_dir, accelerator):
    """The running `torch.profiler.profile` (call its `step()` after each optimizer step), or None
    when profile.active is 0."""
    p = cfg.profile
    if not p.active:
        yield None
        return
    cuda = accelerator.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU, *([torch.profiler.ProfilerActivity.CUDA] if cuda else [])]
    folder = run_dir / "profile"
    write = torch.profiler.tensorboard_trace_handler(str(folder), worker_name=f"rank{accelerator.process_index}")

    def ready(profiler):
        write(profiler)
        if accelerator.is_main_process:
            column = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            table = profiler.key_averages().table(sort_by=column, row_limit=TOP)
            log.info(f"profile of {p.active} steps after step {p.wait + p.warmup} of this session: traces in "
                     f"{folder}; the {TOP} most expensive operators:\n{table}", extra=FILE_ONLY)
            log.info(f"profile written to {folder} (tensorboard --logdir {folder}, or ui.perfetto.dev)")

    schedule = torch.profiler.schedule(wait=p.wait, warmup=p.warmup, active=p.active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=ready,
                                record_shapes=True, with_stack=False) as profiler:
        yield profiler
