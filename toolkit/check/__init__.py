"""`launch.py check`: the toolkit's promises measured on a recipe and its config, in minutes, before
the long job. Each property is one function that does real work on the recipe's own data, model
and loss (an evaluation, a few dozen training steps, a resume) and returns a `Row`: PASS or FAIL
(SKIP where the recipe gives it nothing to measure), what it measured, and for a FAIL the fix.

    contract     the hooks, loss()'s (loss, counts) with samples and loss_per's count, a loss with
                 a gradient, checkpoint.monitor among validation's metrics
    repeatable   two calls of datasets() give the same lengths and the same first samples
    samples      an evaluation counts each sample once, with the same metrics, with 0 and 2
                 DataLoader workers and 2 processes: the split's first samples (a short stream:
                 all of it), as many as there are
    summable     eval_batch_size B and B/3 give the same metrics: the counts are sums
    learns       a few dozen steps on a few batches: their loss falls clearly
    resume       N steps unbroken against k steps, a stop, a resume and the rest: the same
                 weights, bit for bit, with the recipe's num_workers
    input        how much of a step waits for data

The training runs go to a temporary folder; their consoles are kept, and shown for a row that
fails with an error. The check runs in one process; for the count with 2 processes it starts 2
(on CPUs, gloo: forked from a pre-imported interpreter; with GPUs, by `torchrun`) and reads their
counts back (`counts_main`).

    rows.py                 Row, a property's errors turned into its row, the lines printed
    work.py                 what the properties share: the recipe and its config, an evaluation,
                            a training run, which samples of a split they read
    data_properties.py      contract, repeatable, samples, summable, each beside its fix
    training_properties.py  learns, resume, input, each beside its fix
    count.py                the count with 2 processes: torchrun, its side, its error
    command.py              check(): the recipe loaded, the properties measured in order
"""

from toolkit.check.command import check
from toolkit.check.count import counts_main
from toolkit.check.rows import Row, ending

__all__ = ["Row", "check", "counts_main", "ending"]
