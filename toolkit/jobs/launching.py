"""What a sweep and a search share: their runs are `launch.py` processes of one recipe, in one
folder, <output_dir>/<recipe>/<kind>-<time>/, started with the same config files and fixed values
(and grouped in the trackers under the folder's name: `tracking.group_overrides`)."""

import shlex
import sys
import time
from pathlib import Path

from toolkit import config
from toolkit.run import rundir

LAUNCH = Path(__file__).resolve().parents[2] / "launch.py"  # the repository's, above toolkit/jobs/


def values(text):
    """`1e-3,3e-3` -> ["1e-3", "3e-3"]; commas inside [...] or {...} do not split: `[a,b]` is one."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def read_layers(files, overrides, block, varies):
    """A sweep's or a search's config files and overrides, split into what stays and what varies:
    (the files, each with a `block:` as (path, its other keys); [(path, its block)]; the fixed
    overrides; {key: text} of the overrides that `varies(text)` picks out)."""
    plain_files, blocks = [], []
    for path in files:
        layer = config.yaml_load(Path(path).read_text(encoding="utf-8"), path) if Path(path).is_file() else None
        if isinstance(layer, dict) and block in layer:
            blocks.append((path, layer.pop(block)))
            plain_files.append((path, layer))
        else:
            plain_files.append(path)
    fixed, varying = [], {}
    for text in overrides:
        key, raw = config.parse_override(text)
        if varies(raw):
            varying[key] = raw
        else:
            fixed.append(text)
    return plain_files, blocks, fixed, varying


def claim_folder(base, recipe, kind):
    """The new folder <output_dir>/<recipe>/<kind>-<time> of a sweep or a search (`base`: its config)."""
    return rundir.claim_folder(Path(base.output_dir) / recipe.name / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def copy_configs(folder, files):
    """The config files (paths, or (path, its keys) for a file whose block was taken out) as every run
    reads them, copied into `folder` as config-<i>.yaml: a search resumed later, or joined from another
    machine, and the last run of a long sweep read the values the first one did. Returns the names."""
    names = []
    for i, f in enumerate(files):
        layer = f[1] if isinstance(f, tuple) else config.yaml_load(Path(f).read_text(encoding="utf-8"), f) or {}
        rundir.write_text(folder / f"config-{i}.yaml", config.yaml_dump(layer))
        names.append(f"config-{i}.yaml")
    return names


def command(launcher, recipe_path, files, overrides, output_dir, name, autoresume=False):
    """The command line of one run: `launcher` (e.g. 'accelerate launch --num_processes 2', or ""
    for this Python) launch.py RECIPE --config FILE ... OVERRIDES output_dir=... name=..."""
    return [*(shlex.split(launcher) or [sys.executable]), str(LAUNCH), str(recipe_path),
            *(a for f in files for a in ("--config", str(f))), *overrides, f"output_dir={output_dir}", f"name={name}",
            *(["--autoresume"] if autoresume else [])]
