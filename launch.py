"""Train a recipe.

    python launch.py recipes/lenet.py [--config a.yaml ...] [key.sub=value ...]
    accelerate launch [launcher options] launch.py recipes/lenet.py [...]

Config layers, later wins: toolkit defaults < the recipe's `config` < each --config file < key=value.
"""

import argparse
import os
import sys

from toolkit import UserError


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Train a recipe. Config layers, later wins: toolkit defaults < the recipe's config "
                    "< each --config file (in order) < key=value overrides.",
        epilog="example: python launch.py recipes/lenet.py --config my.yaml optim.lr=3e-3 epochs=5",
    )
    parser.add_argument("recipe", help="path to a recipe file, e.g. recipes/lenet.py")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. optim.lr=3e-3 trackers=[]")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="a YAML file of config values; repeatable, later files win")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")
    return parser.parse_intermixed_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from toolkit import config, recipe as recipes

        recipe = recipes.load(args.recipe)
        cfg = config.resolve(recipe.config, args.config, args.overrides)

        from toolkit import loop  # imports accelerate: only once the input is known to be good

        loop.train(recipe, cfg)
    except UserError as e:
        if args.debug:
            raise
        # Bad input fails the same way on every rank: say it once.
        if os.environ.get("RANK", "0") == "0":
            for line in str(e).splitlines():
                print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
