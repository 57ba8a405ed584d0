"""The house: `ls toolkit/` shows the architecture, packages import only downwards, one module
names the distributed strategies, and every name that earlier docs gave recipes still imports."""

import ast
import importlib
import re

from helpers import REPO
from toolkit import recipe

TOOLKIT = REPO / "toolkit"


def modules():
    """Every module of the toolkit: (its path, its dotted name)."""
    for path in sorted(TOOLKIT.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        yield path, name


def room(name):
    """The room a dotted module name lives in: its package (config, run, ...) or its top module."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def imported(path, name):
    """The toolkit modules that `path` imports anywhere in it (at the top or inside a function)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{name}: a relative import")
        if isinstance(node, ast.ImportFrom) and node.module == "toolkit":
            yield from (f"toolkit.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toolkit."):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("toolkit."))


def test_toolkit_shows_its_rooms_in_one_listing():
    entries = sorted(p.name for p in TOOLKIT.iterdir() if p.name not in ("__init__.py", "__pycache__")
                     and not p.name.startswith("."))
    assert len(entries) <= 14, entries
    for package in ("config", "data", "distributed", "state", "run", "jobs", "check"):
        assert (TOOLKIT / package / "__init__.py").read_text().startswith('"""'), f"{package} says what it holds"
    assert {"loop.py", "evaluation.py", "distributed"} <= set(entries)


def test_no_module_is_over_400_lines():
    long = {name: n for path, name in modules() if (n := len(path.read_text().splitlines())) > 400}
    assert not long


# The rooms from the lowest up (docs/architecture.md): a room imports only rooms of lower levels,
# so there is no import cycle between them.
LEVELS = [("config", "data", "distributed"), ("metrics",), ("optim", "recipe"), ("run",), ("state",), ("build",),
          ("evaluation", "memory"), ("loop",), ("jobs",), ("check",)]


def test_rooms_import_only_the_rooms_below_them():
    level = {room: i for i, rooms in enumerate(LEVELS) for room in rooms}
    assert set(level) == {room(name) for _, name in modules()} - {None}  # every room has its level
    upward = set()
    for path, name in modules():
        for target in imported(path, name):  # `from toolkit import UserError` names no room
            if room(name) and room(target) in level and level[room(target)] >= level[room(name)] \
                    and room(target) != room(name):
                upward.add(f"{name} imports {target}")
    assert not upward


def test_one_module_names_the_distributed_strategies():
    """DDP's, FSDP's and DeepSpeed's differences are plain functions of toolkit/distributed/."""
    naming = [name for path, name in modules() if re.search(r"DistributedType|FSDP|DeepSpeed", path.read_text(), re.I)]
    assert naming and all(name.startswith("toolkit.distributed") for name in naming), naming


def test_names_that_earlier_docs_gave_recipes_still_import(tmp_path):
    from toolkit import PeerFailure, UserError  # noqa: F401
    from toolkit.data import SeededSamples, TensorDataset, load_cifar10, load_mnist, stream_part  # noqa: F401
    from toolkit.readers import load_mnist as old_load_mnist, read_idx  # noqa: F401
    from toolkit.streams import StreamPart, stream_part as old_stream_part  # noqa: F401

    assert old_load_mnist is load_mnist and old_stream_part is stream_part  # the same functions, not copies
    assert importlib.import_module("toolkit.readers") is importlib.import_module("toolkit.data.readers")
    assert importlib.import_module("toolkit.streams").__spec__.name == "toolkit.data.streams"
    # A recipe as an earlier README wrote it loads, and its data is served.
    old = tmp_path / "old.py"
    old.write_text("import torch\n"
                   "from toolkit import UserError\n"
                   "from toolkit.data import TensorDataset\n"
                   "from toolkit.readers import load_mnist\n"
                   "from toolkit.streams import stream_part\n"
                   "config = {}\n"
                   "def datasets(cfg):\n"
                   "    return {'train': TensorDataset(torch.arange(6.0), torch.zeros(6))}\n"
                   "def model(cfg):\n"
                   "    return torch.nn.Linear(1, 1)\n"
                   "def loss(model, batch, cfg):\n"
                   "    return model(batch[0][:, None]).mean(), {'samples': len(batch[0])}\n")
    loaded = recipe.load(old)
    assert len(loaded.datasets({})["train"]) == 6
