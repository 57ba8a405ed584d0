"""The error of a bad config."""

from toolkit import UserError


class ConfigError(UserError):
    """One or more configuration problems, reported together."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
