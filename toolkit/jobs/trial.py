"""A search's study, and a trial's side of it: the hook through which a run that a search started
reports its validations (`Trial`), which launch.py finds in the run's environment and gives the
training loop. The loop itself knows nothing of searches."""

import os
from pathlib import Path

from toolkit.run import rundir

NAME = "search"  # the study's name in its journal file
ENV_FOLDER, ENV_TRIAL = "MINLOOP_SEARCH", "MINLOOP_TRIAL"  # how a trial's process finds its study


def storage(folder):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(Path(folder) / "study.journal")))


def load_study(store, settings, seed=None):
    import optuna

    if settings["pruner"] == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=settings["startup_trials"])
    elif settings["pruner"] == "halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner()
    else:
        pruner = optuna.pruners.NopPruner()
    seed = settings["seed"] if seed is None else seed
    sampler = optuna.samplers.RandomSampler(seed) if settings["sampler"] == "random" else \
        optuna.samplers.TPESampler(seed=seed)
    return optuna.load_study(study_name=NAME, storage=store, sampler=sampler, pruner=pruner)


class Trial:
    """The hook through which a search's trial reports each validation to its study, and hears
    whether the study's pruner stops it: `report(value, step) -> True` to stop. The training
    loop calls it on the main process only and tells the other processes the answer.

    The step is the validation's number (1, 2, ...; the loop keeps the count across resumes), so
    that trials with different batch sizes are compared at the same point."""

    def __init__(self, folder, number):
        self.folder, self.number, self.trial = Path(folder), number, None

    def report(self, value, step):
        if self.trial is None:  # on the first validation: a process that never reports needs no Optuna
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            store = storage(self.folder)
            study = load_study(store, rundir.read_json(self.folder / "settings.json"))
            trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(NAME), self.number)
            self.trial = optuna.trial.Trial(study, trial_id)
        self.trial.report(value, step)
        return self.trial.should_prune()


def trial_from_environment():
    """The `Trial` that this run is, when a search started it (MINLOOP_SEARCH, MINLOOP_TRIAL), else None."""
    if ENV_FOLDER not in os.environ:
        return None
    return Trial(os.environ[ENV_FOLDER], int(os.environ[ENV_TRIAL]))
