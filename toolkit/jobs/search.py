"""Hyperparameter search with Optuna, with pruning, parallel trials and several machines.

    python launch.py search recipes/lenet.py "optim.lr=loguniform(1e-4,1e-1)" "batch_size=int(32,256)" \
        "optim.name=choice(adam,sgd)" epochs=5 --trials 40 --parallel 4
    python launch.py search recipes/lenet.py --config space.yaml --trials 40     # with a `search:` block:
        search:
          optim.lr: loguniform(1e-4, 1e-1)
          batch_size: int(32, 256)
    python launch.py search --resume runs/lenet/search-20261124-130102          # continue it, or join it

The space (`toolkit.jobs.space`): `uniform(low,high)`, `loguniform(low,high)` (floats), `int(low,high)`,
`logint(low,high)` (integers, both bounds included) and `choice(a,b,...)` (values as they would be
written after `key=`). Every other `key=value` is fixed for all trials. The objective is `checkpoint.monitor`, the
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
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from toolkit import UserError, config
from toolkit.jobs import launching, space, sweep
from toolkit.jobs.pool import Pool
from toolkit.jobs.trial import ENV_FOLDER, ENV_TRIAL, NAME, load_study, storage
from toolkit.run import rundir, trackers
from toolkit.run.summary import Status, Summary, alive

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
# Starting and continuing a search

def start(recipe, files, overrides, trials, parallel_runs, launcher, pruner, startup_trials, sampler, seed):
    """A new search folder, checked first; then run it."""
    optuna = import_optuna()
    from optuna.distributions import distribution_to_json

    if trials < 1:
        raise UserError(f"--trials {trials}: must be 1 or more")
    plain_files, fixed, searched = space.read_space(files, overrides)
    distributions = space.check_space(recipe, plain_files, fixed, searched)
    base = config.resolve(recipe.config, plain_files, fixed)
    pool = Pool(parallel_runs)  # refuses --parallel larger than the GPUs before anything is written

    folder = launching.claim_folder(base, recipe, "search")
    # The recipe as the search started: a search resumed later, or joined from another machine, runs
    # the same code (and the same config files: copy_configs).
    shutil.copy2(recipe.path, folder / Path(recipe.path).name)
    settings = {"recipe": Path(recipe.path).name, "files": launching.copy_configs(folder, plain_files),
                "overrides": fixed,
                "space": searched,
                "distributions": {key: distribution_to_json(d) for key, d in distributions.items()},
                "trials": trials, "monitor": base.checkpoint.monitor,
                "direction": "maximize" if base.checkpoint.mode == "max" else "minimize",
                "pruner": pruner, "startup_trials": startup_trials, "sampler": sampler, "seed": seed,
                "launcher": launcher, "cwd": os.getcwd(), "grouping": trackers.group_overrides(base, folder.name)}
    rundir.write_json(folder / "settings.json", settings)
    optuna.create_study(storage=storage(folder), study_name=NAME, direction=settings["direction"])
    print(f"search of {trials} trials in {folder}: {', '.join(f'{k}={v}' for k, v in searched.items())}; "
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
    pool = Pool(parallel_runs)
    print(f"search in {folder}: working on it until it has {settings['trials']} trials", flush=True)
    return Driver(folder, settings, pool).run()


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
            latest = rundir.read_json(self.folder / "settings.json")
            self.settings["trials"] = latest.get("trials", self.settings["trials"])
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
                      f"{' '.join(f'{k}={space.text_of(v)}' for k, v in params.items())}", flush=True)
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
            distributions = {key: json_to_distribution(text) for key, text in self.settings["distributions"].items()}
            trial = self.study.ask(distributions)
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
        values = [f"{key}={space.text_of(value)}" for key, value in params.items()]
        return launching.command(s["launcher"], self.folder / s["recipe"], [self.folder / f for f in s["files"]],
                                 [*s["overrides"], *values, *s["grouping"]], self.folder, f"trial-{number:04d}",
                                 autoresume=True)

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

        names = {TrialState.COMPLETE: Status.FINISHED, TrialState.PRUNED: Status.PRUNED, TrialState.FAIL: Status.FAILED}
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
        for override in self.settings["grouping"]:  # the search's own, not the trial's hyperparameter
            key, value = config.parse_override(override)
            tracker, name = key.split(".")
            if values.get(tracker, {}).get(name) == value:
                values[tracker][name] = ""
        header = (f"# trial {best.number} of {self.folder}: {self.settings['monitor']}={best.value:.6g}, the best of "
                  f"{len(rows)}\n# python launch.py <recipe> --config best.yaml\n")
        rundir.write_text(self.folder / "best.yaml", header + config.yaml_dump(values))
        print(f"best: trial {best.number}, {self.settings['monitor']}={best.value:.4g}; its config: "
              f"{self.folder / 'best.yaml'}")


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
