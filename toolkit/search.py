"""Hyperparameter search with Optuna, with pruning, parallel trials and several machines.

    python launch.py search recipes/lenet.py "optim.lr=loguniform(1e-4,1e-1)" "batch_size=int(32,256)" \
        "optim.name=choice(adam,sgd)" epochs=5 --trials 40 --parallel 4
    python launch.py search recipes/lenet.py --config space.yaml --trials 40     # with a `search:` block:
        search:
          optim.lr: loguniform(1e-4, 1e-1)
          batch_size: int(32, 256)
    python launch.py search --resume runs/lenet/search-20261124-130102          # continue it, or join it

The space: `uniform(low,high)`, `loguniform(low,high)` (floats), `int(low,high)`, `logint(low,high)`
(integers, both bounds included) and `choice(a,b,...)` (values as they would be written after
`key=`). Every other `key=value` is fixed for all trials. The objective is `checkpoint.monitor`, the
best value a trial reached, minimised or maximised as `checkpoint.mode` says.

How it runs: Optuna's ask-and-tell. This process asks the study for a trial's values, runs
`launch.py RECIPE ... name=trial-NNNN --autoresume` as a process of its own, in the run folder
<search>/<recipe>/trial-NNNN, and tells the study how the trial ended: its best monitor value, pruned
or failed. The trial's training loop reports every validation to the study through its hook
(`Trial`, which launch.py finds in the run's environment and gives the loop), and the study's
pruner may stop it there: the run then ends with status `pruned` and exit status 0.

The study is a file, <search>/study.journal (Optuna's JournalStorage), so any number of
`search --resume` processes, on machines that share the folder, work on one study. Asking for a
trial happens under a lock together with counting the trials, so exactly --trials trials are
started. A search process keeps a heartbeat file in <search>/drivers/; the trials of one that is gone
(its process ended on this machine, or its heartbeat has not moved for a minute) are taken over and
continued from their last checkpoint (`--autoresume`), so a search that was killed ends with exactly
--trials finished, pruned and failed trials.
"""

import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from toolkit import UserError, config, parallel, rundir, sweep
from toolkit.report import alive
from toolkit.summary import Status, Summary

NAME = "search"  # the study's name in its journal file
ENV_FOLDER, ENV_TRIAL = "MINLOOP_SEARCH", "MINLOOP_TRIAL"  # how a trial's process finds its study
KINDS = ("uniform", "loguniform", "int", "logint", "choice")
SPEC = re.compile(r"\s*(\w+)\((.*)\)\s*", re.S)
STALE_S = 60  # a heartbeat file that has not changed for this long belongs to a search that is gone
HOST = socket.gethostname()


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("search needs optuna: pip install -e '.[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module prints its own lines
    return optuna


# ---------------------------------------------------------------------------------------------
# The space

def is_space(text):
    """Whether a value is a space: it starts with one of the KINDS and a parenthesis."""
    return text.strip().startswith(tuple(f"{kind}(" for kind in KINDS))


def read_space(files, overrides):
    """(config files without their search: block, fixed overrides, {key: spec text}) from the
    command line and the files; like sweep.read_grid."""
    plain_files, blocks, fixed, varying = sweep.read_layers(files, overrides, "search", is_space)
    space = {}
    for path, block in blocks:
        if not isinstance(block, dict) or not all(isinstance(v, str) for v in block.values()):
            raise UserError(f"{path}: search: must map keys to spaces, e.g. optim.lr: loguniform(1e-4, 1e-1)")
        space.update(block)
    space.update(varying)
    if not space:
        raise UserError("nothing to search: give a space such as optim.lr=loguniform(1e-4,1e-1) on the command "
                        "line or in a search: block of a --config file")
    return plain_files, fixed, space


def check_space(recipe, files, fixed, space):
    """{key: Optuna distribution}; a ConfigError with one line per problem, each naming its key."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    base = config.resolve(recipe.config, files, fixed)
    if not base.checkpoint.monitor:
        raise UserError("search needs an objective: set checkpoint.monitor, e.g. checkpoint.monitor=val/loss")
    defaults = config.flatten(base)
    fixed_keys = {config.parse_override(text)[0]: text for text in fixed}
    problems, distributions = [], {}
    for key, spec in space.items():
        where = f"{key}={spec}"
        match = SPEC.fullmatch(str(spec))
        if not match or match.group(1) not in KINDS:
            problems.append(f"{where}: expected {', '.join(f'{k}(...)' for k in KINDS)}, e.g. "
                            f"loguniform(1e-4,1e-1), int(32,256) or choice(adam,sgd)")
            continue
        if key in ("output_dir", "name", "checkpoint.monitor", "checkpoint.mode"):
            problems.append(f"{where}: {key} cannot be searched (the search sets the folders and the objective)")
            continue
        if key in fixed_keys:
            problems.append(f"{where}: {key} is also fixed by {fixed_keys[key]}; keep one of them")
            continue
        kind, texts = match.group(1), [t.strip() for t in sweep.values(match.group(2))]
        default = defaults.get(key)
        if kind == "choice":
            if len(texts) < 2 or "" in texts:
                problems.append(f"{where}: a choice needs two or more values, e.g. choice(adam,sgd)")
                continue
            candidates, distribution = texts, CategoricalDistribution(texts)
        else:
            numbers = [config.yaml_load(t, where) if t else None for t in texts]
            integer = kind in ("int", "logint")
            if len(numbers) != 2 or not all(isinstance(n, int if integer else (int, float)) and
                                            not isinstance(n, bool) for n in numbers):
                problems.append(f"{where}: expected {kind}(low,high) with two {'integers' if integer else 'numbers'}")
                continue
            low, high = numbers
            if not low < high:
                problems.append(f"{where}: the low bound {low} must be below the high bound {high}")
                continue
            if kind.startswith("log") and low <= 0:
                problems.append(f"{where}: a log scale needs a low bound above 0")
                continue
            if isinstance(default, (bool, str, list)) or (not integer and isinstance(default, int)):
                wanted = "int(...) or logint(...)" if isinstance(default, int) and not isinstance(default, bool) \
                    else "choice(...)"
                problems.append(f"{where}: {key} takes {type(default).__name__} values, not {kind} ones; "
                                f"use {wanted}")
                continue
            log = kind.startswith("log")
            distribution = IntDistribution(low, high, log=log) if integer else FloatDistribution(low, high, log=log)
            candidates = [text_of(low if integer else float(low)), text_of(high if integer else float(high))]
        # The values go through the config's own checks: unknown keys, types, choices, minimums.
        for text in candidates:
            try:
                layer = _nest(key, text if isinstance(default, str) else config.yaml_load(text, where))
                config.resolve(recipe.config, [*files, ("the search space", layer)], fixed)
            except config.ConfigError as e:
                problems += [p for p in e.problems if p not in problems]
        distributions[key] = distribution
    if problems:
        raise config.ConfigError(problems)
    return distributions


def text_of(value):
    """A sampled value as it is written on the command line: choices as given, numbers exactly."""
    return repr(float(value)) if isinstance(value, float) else str(value)


def _nest(key, value):
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


# ---------------------------------------------------------------------------------------------
# Starting and continuing a search

def start(recipe, files, overrides, trials, parallel_runs, launcher, pruner, startup_trials, sampler, seed):
    """A new search folder, checked first; then run it."""
    optuna = import_optuna()
    from optuna.distributions import distribution_to_json

    if trials < 1:
        raise UserError(f"--trials {trials}: must be 1 or more")
    plain_files, fixed, space = read_space(files, overrides)
    distributions = check_space(recipe, plain_files, fixed, space)
    base = config.resolve(recipe.config, plain_files, fixed)
    pool = parallel.Pool(parallel_runs)  # refuses --parallel larger than the GPUs before anything is written

    folder = rundir.claim_folder(Path(base.output_dir) / recipe.name / f"search-{time.strftime('%Y%m%d-%H%M%S')}")
    # The recipe and the config files as the search started: a search resumed later, or joined
    # from another machine, runs the same code and values.
    shutil.copy2(recipe.path, folder / Path(recipe.path).name)
    copies = []
    for i, f in enumerate(plain_files):
        layer = f[1] if isinstance(f, tuple) else config.yaml_load(Path(f).read_text(encoding="utf-8"), f) or {}
        (folder / f"config-{i}.yaml").write_text(config.yaml_dump(layer), encoding="utf-8")
        copies.append(f"config-{i}.yaml")
    settings = {"recipe": Path(recipe.path).name, "files": copies, "overrides": fixed, "space": space,
                "distributions": {key: distribution_to_json(d) for key, d in distributions.items()},
                "trials": trials, "monitor": base.checkpoint.monitor,
                "direction": "maximize" if base.checkpoint.mode == "max" else "minimize",
                "pruner": pruner, "startup_trials": startup_trials, "sampler": sampler, "seed": seed,
                "launcher": launcher, "cwd": os.getcwd(), "wandb_group": "" if base.wandb.group else folder.name}
    rundir.write_json(folder / "settings.json", settings)
    optuna.create_study(storage=storage(folder), study_name=NAME, direction=settings["direction"])
    print(f"search of {trials} trials in {folder}: {', '.join(f'{k}={v}' for k, v in space.items())}; "
          f"objective {settings['monitor']} ({settings['direction']}), pruner {pruner}", flush=True)
    return Driver(folder, settings, pool).run()


def resume(folder, trials=None, parallel_runs=1, launcher=None):
    """Continue the search in `folder` (or work on it beside other machines) until it has its trials."""
    import_optuna()
    folder = Path(folder)
    settings = rundir.read_json(folder / "settings.json")
    if not settings or not (folder / "study.journal").is_file():
        raise UserError(f"{folder} is not a search folder (no settings.json and study.journal in it)")
    if trials is not None:  # for every process that works on it
        settings["trials"] = trials
        rundir.write_json(folder / "settings.json", settings)
    if launcher is not None:
        settings["launcher"] = launcher
    pool = parallel.Pool(parallel_runs)
    print(f"search in {folder}: working on it until it has {settings['trials']} trials", flush=True)
    return Driver(folder, settings, pool).run()


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


# ---------------------------------------------------------------------------------------------
# The search process

class Driver:
    """Asks for trials, runs them K at a time, tells how they ended; see the module's docstring."""

    def __init__(self, folder, settings, pool):
        # Absolute: the trials run in the directory the search started from, which may be another.
        self.folder, self.settings, self.pool = Path(folder).resolve(), settings, pool
        if len(pool.free) > 1:
            pool.output_dir = self.folder / "console"
        self.recipe_name = Path(settings["recipe"]).stem
        self.me = f"{HOST}-{os.getpid()}"
        self.heartbeat, self.last_beat = self.folder / "drivers" / self.me, 0
        self.seen = {}  # another search process -> (its heartbeat's mtime, when this one saw it change)
        self.store = storage(folder)
        self.study_id = self.store.get_study_id_from_name(NAME)
        # Each search process draws its own values: two with the same seed would ask for the same
        # ones. The first gets the seed itself, so that a search on one machine is repeatable.
        started = len(self.store.get_all_trials(self.study_id, deepcopy=False))
        self.study = load_study(self.store, settings, settings["seed"] + started)
        self.stopping = None  # the signal that asked this process to stop

    def run(self):
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.beat()
        try:
            self.loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.heartbeat.unlink(missing_ok=True)
        if self.stopping:
            print(f"search stopped; trials that were running continue with: python launch.py search --resume "
                  f"{self.folder}", file=sys.stderr)
            return 128 + self.stopping
        self.report()
        return 0

    def _stop(self, signum, frame):
        self.stopping = self.stopping or signum

    def loop(self):
        while not self.stopping:
            self.beat()
            # --resume --trials N, from any process, changes the count for all of them
            self.settings["trials"] = rundir.read_json(self.folder / "settings.json").get("trials",
                                                                                           self.settings["trials"])
            while self.pool.free and not self.stopping:
                job = self.next_trial()
                if job is None:
                    break
                number, params, fresh = job
                if not fresh and Summary.read(self.run_dir(number)).status.ended:
                    self.finish(number, 0)  # it ended after its search process did
                    continue
                # From the directory the search started in: relative paths in its config mean the same.
                cwd = self.settings["cwd"] if Path(self.settings["cwd"]).is_dir() else None
                slot = self.pool.start(number, self.command(number, params),
                                       {ENV_FOLDER: str(self.folder), ENV_TRIAL: str(number)}, cwd,
                                       self.run_dir(number).name, fork=not self.settings["launcher"])
                print(f"[trial {number}] {'started' if fresh else 'continued'} on {slot}: "
                      f"{' '.join(f'{k}={text_of(v)}' for k, v in params.items())}", flush=True)
            if not self.pool.running and self.done():
                return
            for number, code in self.pool.wait(timeout=5 if self.pool.running else 2, stop=lambda: self.stopping):
                self.finish(number, code)
        for number, code in self.pool.stop():  # each saves a checkpoint; a later --resume continues it
            self.finish(number, code)

    def done(self):
        trials = self.study.get_trials(deepcopy=False)
        return len(trials) >= self.settings["trials"] and all(t.state.is_finished() for t in trials)

    def next_trial(self):
        """(number, params, fresh) of a new trial or of one whose search process is gone; None when
        there is neither. Under the lock: two processes must not count the same trials."""
        from optuna.distributions import json_to_distribution
        from optuna.storages.journal import JournalFileSymlinkLock
        from optuna.trial import TrialState

        lock = JournalFileSymlinkLock(str(self.folder / "study.claim"))
        lock.acquire()
        try:
            trials = self.study.get_trials(deepcopy=False)
            for trial in trials:
                if trial.state == TrialState.RUNNING and self.orphaned(trial):
                    self.set_attr(trial.number, "driver", self.me)
                    return trial.number, trial.params, False
            if len(trials) >= self.settings["trials"]:
                return None
            space = {key: json_to_distribution(text) for key, text in self.settings["distributions"].items()}
            trial = self.study.ask(space)
            trial.set_user_attr("driver", self.me)
            return trial.number, trial.params, True
        finally:
            lock.release()

    def orphaned(self, trial):
        """Whether the search process that ran `trial` is gone, and its run has stopped."""
        driver = trial.user_attrs.get("driver", "")
        if driver == self.me:
            return False
        host, _, pid = driver.rpartition("-")
        try:
            mtime = (self.folder / "drivers" / driver).stat().st_mtime if driver else None
        except OSError:
            mtime = None  # it ended, or never started a heartbeat
        if mtime is not None and self.seen.get(driver, (None,))[0] != mtime:
            self.seen[driver] = (mtime, time.monotonic())
        gone = (mtime is None or time.monotonic() - self.seen[driver][1] > STALE_S
                or (host == HOST and not alive(pid)))
        if not gone:
            return False
        # Its run may still be saving a checkpoint (it is told to stop when its search process dies).
        summary = Summary.read(self.run_dir(trial.number))
        return not (summary.status == Status.RUNNING and summary.host == HOST and alive(summary.pid))

    def beat(self):
        """Touch this process's heartbeat file (every few seconds)."""
        now = time.monotonic()
        if not self.last_beat or now - self.last_beat > 5:
            self.heartbeat.parent.mkdir(exist_ok=True)
            self.heartbeat.touch()
            self.last_beat = now

    def set_attr(self, number, key, value):
        self.store.set_trial_user_attr(self.store.get_trial_id_from_study_id_trial_number(self.study_id, number),
                                       key, value)

    def run_dir(self, number):
        return self.folder / self.recipe_name / f"trial-{number:04d}"

    def command(self, number, params):
        s = self.settings
        return [*(shlex.split(s["launcher"]) or [sys.executable]), str(sweep.LAUNCH),
                str(self.folder / s["recipe"]), *(a for f in s["files"] for a in ("--config", str(self.folder / f))),
                *s["overrides"], *(f"{key}={text_of(value)}" for key, value in params.items()),
                *([f"wandb.group={s['wandb_group']}"] if s["wandb_group"] else []),
                f"output_dir={self.folder}", f"name=trial-{number:04d}", "--autoresume"]

    def finish(self, number, code):
        """Tell the study how trial `number` ended, from its run folder and exit status."""
        from optuna.trial import TrialState

        run = self.run_dir(number)
        summary = Summary.read(run)
        status = summary.status
        if self.stopping and status in (Status.INTERRUPTED, Status.RUNNING, Status.UNKNOWN):
            return  # stopped with this search: left running in the study, for --resume
        self.set_attr(number, "exit", code)
        value = summary.best_value
        if code == 0 and status == Status.FINISHED and value is not None and math.isfinite(value):
            self.study.tell(number, value, skip_if_finished=True)
            line = f"finished: {self.settings['monitor']}={value:.4g}"
        elif code == 0 and status == Status.PRUNED:
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
            line = f"pruned at step {summary.steps}"
        else:
            error = summary.error or (f"no {self.settings['monitor']} was measured" if status == Status.FINISHED
                                      else f"exit status {code}")
            self.set_attr(number, "error", error)
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            line = f"failed: {error}"
        print(f"[trial {number}] {line} | {run}", flush=True)

    def report(self):
        """The table of every trial (best first), search.txt and search.json, and best.yaml."""
        from optuna.trial import TrialState

        names = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
        rows = []
        for trial in self.study.get_trials(deepcopy=False):
            run = self.run_dir(trial.number)
            code = trial.user_attrs.get("exit") or 0
            row = sweep.row([f"#{trial.number}", *(f"{k}={_short(v)}" for k, v in trial.params.items())],
                            run if run.is_dir() else None, code)
            row["status"] = names.get(trial.state, trial.state.name.lower()) + (f" (exit {code})" if code else "")
            row.update(trial=trial.number, params=trial.params, value=trial.value)
            rows.append(row)
        sweep.report(rows, self.folder, "max" if self.settings["direction"] == "maximize" else "min", "search")
        try:
            best = self.study.best_trial
        except ValueError:
            print("no trial finished: no best.yaml")
            return
        values = config.yaml_load((self.run_dir(best.number) / "config.yaml").read_text(encoding="utf-8"), "config")
        for key in ("output_dir", "name"):  # the trial's place, not its hyperparameters
            values.pop(key)
        if self.settings["wandb_group"] and values.get("wandb", {}).get("group") == self.settings["wandb_group"]:
            values["wandb"]["group"] = ""
        header = (f"# trial {best.number} of {self.folder}: {self.settings['monitor']}={best.value:.6g}, the best of "
                  f"{len(rows)}\n# python launch.py <recipe> --config best.yaml\n")
        rundir.write_text(self.folder / "best.yaml", header + config.yaml_dump(values))
        print(f"best: trial {best.number}, {self.settings['monitor']}={best.value:.4g}; its config: "
              f"{self.folder / 'best.yaml'}")


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# The trial's side, in its training loop

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
