"""A minimal-loop training toolkit on HuggingFace Accelerate."""

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
