"""A minimal-loop training toolkit on HuggingFace Accelerate.

    loop.py         the training loop: train(), and plan(), what follows each step
    evaluation.py   exact evaluation, validation (best, early stop, pruning), testing a checkpoint
    build.py        what a run is made of: the recipe's splits and model
    optim.py        optimizers, LR schedules, and the weighing of each step's gradients
    metrics.py      summable counts -> exact metrics over all ranks
    recipe.py       a recipe file, its contract and its hooks
    config/  data/  distributed/  state/  run/  jobs/  check/   (each says what it holds in its __init__.py)
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input from the user (config, command line, recipe, data).

    `launch.py` prints it as one line per message, without a traceback (unless `--debug`),
    and exits with status 2. Raise it from a recipe for problems the user can fix.
    """


class PeerFailure(Exception):
    """This process stopped because another one failed (a collective lost its peer).

    `launch.py` prints it as one line, not a traceback: the failing process prints the real error.
    """


# Module names that earlier docs gave recipes, and where they live now: `from toolkit.readers import
# load_mnist` and `from toolkit.streams import stream_part` keep working (`toolkit.data` has both).
MOVED = {"toolkit.readers": "toolkit.data.readers", "toolkit.streams": "toolkit.data.streams"}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a name of MOVED as the module it moved to: the same module object, not a copy."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the old name's: undone below
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.append(_Moved())
