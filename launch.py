"""Train, resume, test, sweep and look at runs.

    python launch.py recipes/lenet.py [--config a.yaml ...] [key.sub=value ...]    train a new run
    python launch.py resume runs/lenet/<run> [key=value ...]                        continue a run
    python launch.py test runs/lenet/<run> [--checkpoint best|latest|step-N]        evaluate a run
    python launch.py export runs/lenet/<run> OUT [--checkpoint ...] [--ema] [--merge] weights for other code
    python launch.py sweep recipes/lenet.py optim.lr=1e-3,3e-3 [...]               a grid of runs
    python launch.py search recipes/lenet.py "optim.lr=loguniform(1e-4,1e-1)" [...]  a search (Optuna)
    python launch.py check recipes/lenet.py [key=value ...]                          prove a recipe, in minutes
    python launch.py lr-find recipes/lenet.py [key=value ...]                        suggest a learning rate
    python launch.py runs [runs/lenet]                                              list runs
    python launch.py plot runs/lenet/<run> [...]                                    draw their curves
    accelerate launch [launcher options] launch.py ...                              distributed

Config layers, later wins: toolkit defaults < the recipe's `config` < each --config file < key=value.
"""

import argparse
import os
import shlex
import shutil
import signal
import sys

from toolkit import PeerFailure, UserError
from toolkit.recipe import RecipeError

LAYERS = ("Config layers, later wins: toolkit defaults < the recipe's config < each --config file (in order) "
          "< key=value overrides.")


# ---------------------------------------------------------------------------------------------
# The commands: each takes the parsed arguments and returns the exit status.

def train(args):
    from toolkit import config, loop, recipe as recipes
    from toolkit.state import resume

    recipe = recipes.load(args.recipe)
    cfg = config.resolve(recipe.config, args.config, args.overrides)
    run = resume.autoresume_folder(recipe, cfg) if args.autoresume else None
    if run is not None:
        return continue_run(run, args)
    return exit_status(loop.train(recipe, cfg, autoresume=args.autoresume, trial=search_trial()))


def resume(args):
    """Continue a run in its folder from its latest checkpoint, with its saved config and recipe;
    the overrides may change only what leaves the model and the data as they were (toolkit/state/resume.py)."""
    return continue_run(args.run, args)


def continue_run(path, args):
    from toolkit import loop
    from toolkit.state import resume

    run, recipe = resume.load_run(path)
    cfg = resume.resumed_config(run, recipe, args.config, args.overrides, args.force)
    return exit_status(loop.train(recipe, cfg, resume=run, trial=search_trial()))


def search_trial():
    """The hook of a search's trial into the loop, when a search started this run, else None."""
    from toolkit.jobs import trial

    return trial.trial_from_environment()


def test(args):
    from toolkit import config, evaluation
    from toolkit.state import resume

    run, recipe = resume.load_run(args.run)
    cfg = config.resolve(recipe.config, [run / "config.yaml", *args.config], args.overrides)
    evaluation.test(recipe, cfg, run, args.checkpoint, args.split, args.ema)
    return 0


def export(args):
    from toolkit import config
    from toolkit.state import export as exports, resume

    run, recipe = resume.load_run(args.run)
    cfg = config.resolve(recipe.config, [run / "config.yaml"])
    path, written = exports.export(recipe, cfg, run, args.out, args.checkpoint, args.ema, args.merge)
    print(f"exported {path}{' (EMA weights)' if args.ema else ''} to {args.out}: {written}")
    return 0


def exit_status(summary):
    """A run's exit status from its `Summary`: 0 when the run finished; 128 + the signal's number
    when a signal stopped it; 1 when it failed (the error is printed)."""
    from toolkit.run.summary import Status

    if summary.status == Status.INTERRUPTED:
        return 128 + signal.Signals[summary.signal or "SIGINT"].value
    if summary.status == Status.FAILED:
        say_error(summary.error)
        return 1
    return 0


def say_error(text):
    """Print `text` as error lines, once per machine: every rank fails the same way, and a
    machine's own problem (its missing data) shows on its own console."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for line in text.splitlines():
            print(f"error: {line}", file=sys.stderr)


def sweep(args):
    from toolkit import recipe as recipes
    from toolkit.jobs import sweep as sweeps

    sweeps.sweep(recipes.load(args.recipe), args.config, args.overrides, args.launcher, args.parallel)
    return 0


def search(args):
    from toolkit import recipe as recipes
    from toolkit.jobs import search as searches

    if args.resume:
        if args.recipe or args.overrides or args.config:
            raise UserError("search --resume FOLDER continues the search as it was set up: give no recipe, "
                            "key=value or --config (only --trials, --parallel, --launcher)")
        return searches.resume(args.resume, args.trials, args.parallel, args.launcher)
    if not args.recipe:
        raise UserError("search needs a recipe, e.g. python launch.py search recipes/lenet.py "
                        "'optim.lr=loguniform(1e-4,1e-1)' --trials 20; or --resume FOLDER")
    searches.import_optuna()  # before the recipe is loaded: say at once when it is missing
    return searches.start(recipes.load(args.recipe), args.config, args.overrides, 20 if args.trials is None
                          else args.trials, args.parallel, args.launcher or "", args.pruner, args.startup_trials,
                          args.sampler, args.sampler_seed)


def check(args):
    from toolkit import check as checks, recipe as recipes

    if args.counts_to:  # one of the 2 processes that check starts to count samples
        checks.counts_main(recipes.load(args.recipe), args.config, args.overrides, args.counts_to, args.counts_weights)
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("run check as one process (python launch.py check ...): it starts the processes it needs "
                        "itself, and --launcher 'accelerate launch --config_file FILE' trains under that launch "
                        "config")
    if args.launcher and not shutil.which((shlex.split(args.launcher) or [""])[0]):
        raise UserError(f"--launcher {args.launcher!r}: no such command on this machine")
    rows = checks.check(args.recipe, args.config, args.overrides, args.processes, launcher=args.launcher)
    print(checks.ending(rows))
    return 1 if any(row.ok is False for row in rows) else 0


def lr_find(args):
    from toolkit import recipe as recipes
    from toolkit.jobs.lr_find import lr_find as range_test

    range_test(recipes.load(args.recipe), args.config, args.overrides, args.steps, args.start, args.end)
    return 0


def runs(args):
    from toolkit.jobs import runs as tables

    print(tables.list_runs(args.folder))
    return 0


def plot(args):
    from toolkit.jobs import runs as tables

    print(tables.plot(args.runs, args.out))
    return 0


# ---------------------------------------------------------------------------------------------
# The command line: one subcommand each, made of the arguments it takes.

HELP = {  # command -> (description, example)
    "train": ("Train a recipe in a new run folder. " + LAYERS,
              "python launch.py recipes/lenet.py --config my.yaml optim.lr=3e-3 epochs=5\n"
              "other commands: resume, test, export, sweep, search, runs, plot (each with --help)"),
    "resume": (" ".join(resume.__doc__.split()), "python launch.py resume runs/lenet/20261124-130102 epochs=20"),
    "test": ("Evaluate a run's checkpoint on the test split (or val, if the recipe has no test). Prints the "
             "metrics and saves them as <run>/<split>-<checkpoint>.json.",
             "python launch.py test runs/lenet/20261124-130102 --checkpoint latest"),
    "export": ("Write a run's weights (checkpoint best, else latest) into the new folder OUT for code without the "
               "toolkit: a transformers model with save_pretrained (AutoModel*.from_pretrained(OUT) loads it), any "
               "other as model.safetensors beside the run's config.yaml. A recipe's export(cfg, folder) hook adds "
               "the rest, e.g. its tokenizer.",
               "python launch.py export runs/hf_classify/20261124-130102 my-model"),
    "sweep": ("Train every combination of the values given as key=v1,v2 (or in a sweep: block of a --config file),"
              " one run after another (or --parallel K at a time), under one sweep folder; then print the runs, "
              "best first.",
              "python launch.py sweep recipes/lenet.py optim.lr=1e-3,3e-3 batch_size=64,128"),
    "search": ("Search hyperparameters with Optuna (pip install -e '.[search]'): each trial is a run of its own, "
               "its validations are reported to the study, whose pruner may stop it early. Spaces: "
               "key=uniform(a,b), loguniform(a,b), int(a,b), logint(a,b), choice(x,y,...), on the command line or "
               "in a search: block of a --config file; other key=value are fixed. The objective is "
               "checkpoint.monitor (checkpoint.mode). --resume FOLDER continues a search, or joins it from "
               "another machine that shares the folder.",
               "python launch.py search recipes/lenet.py 'optim.lr=loguniform(1e-4,1e-1)' 'batch_size=int(32,256)' "
               "epochs=3 --trials 30 --parallel 2"),
    "check": ("Prove a recipe and its config before the long job, in minutes: its contract, datasets() giving the "
              "same data twice, each sample counted once (with 0 and 2 workers, and 2 processes), metrics that do not "
              "depend on eval_batch_size, a loss that falls on a few batches, a resume bit for bit, and how much of a "
              "step waits for data. One row per property, PASS or FAIL with the fix; the exit status is 1 on a FAIL.",
              "python launch.py check recipes/lenet.py data.root=/usr/share/datasets/fashion-mnist"),
    "lr-find": ("The learning-rate range test: a run of the recipe as it trains, from a fresh model, whose LR grows "
                "exponentially from --start to --end over --steps steps; prints the LR where the smoothed loss falls "
                "fastest (suggested optim.lr=...) and draws the curve into the run's lr_find.png (needs matplotlib: "
                "pip install -e '.[plot]'). Under any launcher, as a run.",
                "python launch.py lr-find recipes/lenet.py data.root=/usr/share/datasets/fashion-mnist"),
    "runs": ("List the run folders under FOLDER with their status, epochs, best metric and time.",
             "python launch.py runs runs/lenet"),
    "plot": ("Draw the loss and metric curves of runs into a PNG, or a search folder's history (needs matplotlib: "
             "pip install -e '.[plot]').",
             "python launch.py plot runs/lenet/20261124-130102 runs/lenet/20261124-140311"),
}


def a_recipe(p):
    p.add_argument("recipe", help="path to a recipe file, e.g. recipes/lenet.py")


def a_run(p):
    p.add_argument("run", help="a run folder, e.g. runs/lenet/20261124-130102")


def overrides(p):
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. optim.lr=3e-3 trackers=[]")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="a YAML file of config values; repeatable, later files win")


def force(p):
    p.add_argument("--force", action="store_true", help="resume (train: with --autoresume) even if the "
                   "overrides change keys that shape the model or the data")


def autoresume(p):
    p.add_argument("--autoresume", action="store_true",
                   help="the run's folder is <output_dir>/<recipe>/<name>; if it has a checkpoint, continue it "
                   "(as resume does) instead of starting again: for jobs that are preempted and restarted")


def which_weights(p):
    p.add_argument("--checkpoint", default="", help="best, latest, or a folder name such as step-0000516 "
                   "(default: best, or latest when the run has no best yet)")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (ema.decay > 0)")


def test_split(p):
    p.add_argument("--split", default="", choices=["", "test", "val"], help="default: test, else val")


def export_out(p):
    p.add_argument("out", help="the folder to write; it must not exist, or be empty")
    p.add_argument("--merge", action="store_true",
                   help="a peft model: its adapter merged into the base, as a plain transformers folder")


def many_runs(default_launcher):
    def add(p):
        p.add_argument("--launcher", default=default_launcher, metavar="COMMAND",
                       help="start each run with this, e.g. 'accelerate launch --multi_gpu --num_processes 2'")
        p.add_argument("--parallel", type=int, default=1, metavar="K",
                       help="K runs at once: each gets its own GPUs (CUDA_VISIBLE_DEVICES), or without GPUs its "
                       "own share of the CPU cores (OMP_NUM_THREADS); their output goes to <folder>/console/")
    return add


def searching(p):
    p.add_argument("recipe", nargs="?", help="path to a recipe file, e.g. recipes/lenet.py")
    p.add_argument("--trials", type=int, metavar="N", help="how many trials (default 20)")
    p.add_argument("--pruner", default="median", choices=["median", "halving", "none"],
                   help="median: stop a trial whose validation is worse than the median of the finished "
                   "trials' at the same validation; halving: asynchronous successive halving")
    p.add_argument("--startup_trials", type=int, default=5, metavar="N",
                   help="median: trials that finish before any is pruned (default 5)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random"], help="how values are chosen")
    p.add_argument("--sampler_seed", type=int, default=0, metavar="S", help="the sampler's seed (default 0)")
    p.add_argument("--resume", metavar="FOLDER",
                   help="continue the search in FOLDER until it has its trials (also from another machine)")


def checking(p):
    p.add_argument("--processes", type=int, default=2, choices=[1, 2],
                   help="2: also count the samples with 2 processes (torchrun, on CPUs without 2 GPUs); 1: not")
    p.add_argument("--launcher", default="", metavar="COMMAND",
                   help="start the learns and resume rows' training runs with this, e.g. 'accelerate launch "
                   "--config_file accelerate_configs/fsdp.yaml': under the strategy the job will train with")
    p.add_argument("--counts-to", help=argparse.SUPPRESS)
    p.add_argument("--counts-weights", help=argparse.SUPPRESS)


def lr_range(p):
    p.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps of the test (default 100)")
    p.add_argument("--start", type=float, default=1e-7, metavar="LR", help="the first step's LR (default 1e-7)")
    p.add_argument("--end", type=float, default=10.0, metavar="LR", help="the last step's LR (default 10)")


def runs_folder(p):
    p.add_argument("folder", nargs="?", default="runs", help="where to look (default: runs)")


def plotted(p):
    p.add_argument("runs", nargs="+", help="run folders, or one search folder")
    p.add_argument("--out", help="the PNG to write (default: <run>/curves.png, or curves.png for several; "
                   "<search>/history.png)")


COMMANDS = {  # name -> (what runs it, what it does, the arguments it takes)
    "train": (train, "train a new run", [a_recipe, overrides, force, autoresume]),
    "resume": (resume, "continue a run", [a_run, overrides, force]),
    "test": (test, "evaluate a run's checkpoint", [a_run, overrides, which_weights, test_split]),
    "export": (export, "weights for code without the toolkit", [a_run, export_out, which_weights]),
    "sweep": (sweep, "a grid of runs", [a_recipe, overrides, many_runs("")]),
    "search": (search, "a search (Optuna)", [searching, overrides, many_runs(None)]),
    "check": (check, "prove a recipe, in minutes", [a_recipe, overrides, checking]),
    "lr-find": (lr_find, "suggest a learning rate", [a_recipe, overrides, lr_range]),
    "runs": (runs, "list runs", [runs_folder]),
    "plot": (plot, "draw their curves", [plotted]),
}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # parse_intermixed_args names an optional nargs="*" positional among the missing ones.
        super().error(message.replace(", key=value", ""))


def parser():
    """launch.py's parser, with one subparser per command. `python launch.py RECIPE` is `train`."""
    top = Parser(prog="launch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (execute, summary, arguments) in COMMANDS.items():
        description, example = HELP[name]
        sub = commands.add_parser(name, help=summary, description=description,
                                  epilog=f"example: {example}", formatter_class=argparse.RawDescriptionHelpFormatter,
                                  prog="launch.py" if name == "train" else f"launch.py {name}")
        for add in arguments:
            add(sub)
        sub.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")
        sub.set_defaults(execute=execute)
    return top, commands.choices


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    top, commands = parser()
    if argv[:1] in (["-h"], ["--help"]):
        top.print_help()
        return 0
    command = argv.pop(0) if argv and argv[0] in commands else "train"
    # Each command's own parser, intermixed: key=value overrides may come before and after options.
    args = commands[command].parse_intermixed_args(argv)
    try:
        return args.execute(args)
    except RecipeError as e:
        if args.debug:
            raise
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(e, file=sys.stderr)  # the recipe's traceback, as Python shows it
        return 2
    except UserError as e:
        if args.debug:
            raise
        say_error(str(e))
        return 2
    except PeerFailure:  # the run said why, as it stopped
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
