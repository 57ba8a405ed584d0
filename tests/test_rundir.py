"""Files that several writers write at once (the machines of one search, a run and its reader)."""

import json
import stat
import subprocess
import sys
import threading

from helpers import REPO

SIZE = 200_000
PAD = "x" * SIZE  # a write long enough for another writer to start in the middle of it

WRITER = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from toolkit.run import rundir
for n in range(40):
    rundir.write_json(sys.argv[1], {{"writer": int(sys.argv[2]), "n": n, "pad": "x" * {SIZE}}})
"""


def complete(path):
    """The file's content, which must be one writer's whole JSON object."""
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["pad"] == PAD and isinstance(data["writer"], int), "a mix of writes"
    return data


def test_writers_of_one_file_at_once_always_leave_a_complete_file(tmp_path):
    from toolkit.run import rundir

    path = tmp_path / "search.json"
    rundir.write_json(path, {"writer": -1, "n": 0, "pad": PAD})
    errors, reads = [], []

    def write(writer):
        try:
            for n in range(40):
                rundir.write_json(path, {"writer": writer, "n": n, "pad": PAD})
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    # 1. Eight threads and four processes write the same file, while this thread reads it.
    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(100 + i)]) for i in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or any(p.poll() is None for p in processes):
        reads.append(complete(path))  # never missing, never a part, never a mix
    for t in threads:
        t.join()

    # 2. Every writer succeeded; the file is the last write of one of them, and no temporary is left.
    assert not errors and [p.wait() for p in processes] == [0] * 4
    assert complete(path)["n"] == 39 and len(reads) > 1
    assert [p.name for p in tmp_path.iterdir()] == ["search.json"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o044, "readable by others, as any other new file"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from toolkit.run import rundir

    path = tmp_path / "summary.json"
    rundir.write_json(path, {"status": "running"})
    try:
        rundir.write_json(path, {"status": object()})  # not JSON: fails before anything is written
    except TypeError:
        pass
    try:
        with rundir.replacing(path) as tmp:
            tmp.write_text("{half")
            raise OSError("disk full")
    except OSError:
        pass
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
