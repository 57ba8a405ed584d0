"""Around the loop: wandb, sweeps, the runs table, plots, notifications, the code snapshot, and the
second recipe (ResNet on CIFAR-10)."""

import base64
import email
import email.policy
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import threading

import pytest
import torch

from helpers import (LENET, PROBE, RESNET, copy_run, launch, launch_two, make_cifar10, make_mnist, ok, only_run,
                     records, run_dirs, summary)
from toolkit import recipe


# ---------------------------------------------------------------------------------------------
# wandb

def test_wandb_offline_makes_one_run_and_resume_continues_it(tiny, tmp_path):
    args = [LENET, *tiny, "epochs=1", "trackers=[tensorboard, wandb]", "wandb.mode=offline"]
    ok(launch_two(args, cwd=tmp_path, env={"WANDB_SILENT": "true"}))
    run = only_run(tmp_path / "runs")
    (first,) = (run / "wandb").glob("offline-run-*")  # one wandb run for two processes
    run_id = first.name.rsplit("-", 1)[1]
    assert (first / f"run-{run_id}.wandb").stat().st_size > 0

    ok(launch(["resume", run, "epochs=2"], cwd=tmp_path, env={"WANDB_SILENT": "true"}))
    assert {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")} == {run_id}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2


def test_mlflow_makes_one_run_per_training_run_and_resume_continues_it(tiny, tmp_path):
    """With MLflow's local file store: one MLflow run, named after the run folder, with the config as
    its parameters; the resume logs into the same run, and every train and val metric is at the
    step that metrics.jsonl gives it."""
    import mlflow

    store = f"file:{tmp_path / 'mlruns'}"
    env = {"MLFLOW_ALLOW_FILE_STORE": "true"}
    args = [LENET, *tiny, "epochs=1", "trackers=[mlflow]", f"mlflow.tracking_uri={store}", "mlflow.experiment=tests"]
    ok(launch(args, cwd=tmp_path, env=env))
    run = only_run(tmp_path / "runs")
    ok(launch(["resume", run, "epochs=2"], cwd=tmp_path, env=env))

    mlflow.set_tracking_uri(store)
    client = mlflow.tracking.MlflowClient()
    (found,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert found.info.run_name == run.name and found.data.params["optim.lr"] == "0.001"
    for split in ("train", "val"):
        steps = [r["step"] for r in records(run, split)]
        assert [m.step for m in client.get_metric_history(found.info.run_id, f"{split}/loss")] == steps
        assert max(steps) == 64  # both epochs: 32 steps each


# ---------------------------------------------------------------------------------------------
# Sweeps

def test_sweep_runs_the_grid_and_ranks_it(tiny, tmp_path):
    result = ok(launch(["sweep", LENET, *tiny, "epochs=1", "trackers=[]", "optim.lr=1e-4,3e-3",
                        "batch_size=64,128"], cwd=tmp_path))
    (sweep,) = (tmp_path / "runs" / "lenet").glob("sweep-*")
    assert len(run_dirs(sweep)) == 4  # one run folder each, inside the sweep folder
    for run in run_dirs(sweep):  # grouped in wandb by the sweep's name
        assert f"group: {sweep.name}" in (run / "config.yaml").read_text()
    table = json.loads((sweep / "sweep.json").read_text())
    assert sorted(r["run"] for r in table) == ["optim.lr=1e-4 batch_size=128", "optim.lr=1e-4 batch_size=64",
                                               "optim.lr=3e-3 batch_size=128", "optim.lr=3e-3 batch_size=64"]
    best = [r["best"] for r in table]
    assert best == sorted(best, reverse=True) and best[0] > best[-1]  # val/accuracy: higher first
    assert all(r["status"] == "finished" for r in table)
    printed = result.stdout.splitlines()
    header = next(i for i, line in enumerate(printed) if line.startswith("run "))
    assert [line.split("  ")[0] for line in printed[header + 1:header + 5]] == [r["run"] for r in table]
    assert (sweep / "sweep.txt").read_text().splitlines()[0].startswith("run ")


def test_a_failing_run_is_reported_and_the_sweep_goes_on(tmp_path):
    result = ok(launch(["sweep", PROBE, "batch_size=32", "epochs=1", "trackers=[]", "checkpoint.monitor=",
                        "fail_rank=0", "fail_step=2,0", f"output_dir={tmp_path}"], cwd=tmp_path))
    (sweep,) = (tmp_path / "probe").glob("sweep-*")
    table = {r["run"]: r for r in json.loads((sweep / "sweep.json").read_text())}
    assert table["fail_step=2"]["status"] == "failed (exit 1)"
    assert table["fail_step=0"]["status"] == "finished"
    assert "ValueError: sample" in result.stderr


def test_a_sweep_block_in_a_config_file(tiny, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("epochs: 1\nsweep:\n  optim.lr: [1e-4, 3e-3]\n")
    ok(launch(["sweep", LENET, "--config", grid, *tiny, "trackers=[]"], cwd=tmp_path))
    (sweep,) = (tmp_path / "runs" / "lenet").glob("sweep-*")
    assert sorted(r["run"] for r in json.loads((sweep / "sweep.json").read_text())) == \
        ["optim.lr=0.0001", "optim.lr=0.003"]
    assert all(summary(run)["epochs"] == 1 for run in run_dirs(sweep))  # the file's other keys apply

    # ... and they are checked with the rest before anything runs.
    grid.write_text("epochz: 1\nsweep:\n  optim.lr: [1e-4, 3e-3]\n")
    refused = launch(["sweep", LENET, "--config", grid, *tiny, f"output_dir={tmp_path / 'typo'}"], cwd=tmp_path)
    assert refused.returncode == 2 and f"unknown key 'epochz' from {grid}" in refused.stderr
    assert not (tmp_path / "typo").exists()


def test_sweep_checks_every_combination_before_running(tiny, tmp_path):
    result = launch(["sweep", LENET, *tiny, "optim.lr=1e-3,fast"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: optim.lr: expected a number, got 'fast' (str), from the command line\n"
    assert not (tmp_path / "runs").exists()


def test_a_plain_run_refuses_a_sweep_block(tiny, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("sweep:\n  optim.lr: [1e-4, 3e-3]\n")
    result = launch([LENET, "--config", grid, *tiny], cwd=tmp_path)
    assert result.returncode == 2 and "unknown key 'sweep'" in result.stderr


# ---------------------------------------------------------------------------------------------
# The runs table, plots, the code snapshot

def test_runs_lists_status_epochs_best_and_time(lenet_run, tmp_path):
    finished = copy_run(lenet_run.run, tmp_path)
    for status in ("failed", "interrupted", "running", "died"):
        copy = finished.with_name(f"{finished.name}-{status}")
        shutil.copytree(finished, copy)
        data = summary(copy)
        data["status"] = "running" if status == "died" else status
        if status in ("running", "died"):  # a live process of this machine, or one that is gone
            data["pid"] = os.getpid() if status == "running" else 2 ** 22 + 1
        (copy / "summary.json").write_text(json.dumps(data))
    table = ok(launch(["runs", tmp_path / "runs"], cwd=tmp_path)).stdout.splitlines()
    assert table[0].split() == ["run", "recipe", "status", "epochs", "best", "time"]
    rows = {line.split()[0].rsplit("/", 1)[1]: line.split() for line in table[1:]}
    assert rows[finished.name][1:5] == ["lenet", "finished", "3/3", f"val/accuracy={summary(finished)['best']['value']:.4g}"]
    for status in ("failed", "interrupted", "running", "died"):
        assert rows[f"{finished.name}-{status}"][2] == status


def test_plot_writes_a_png(lenet_run, tmp_path):
    run = copy_run(lenet_run.run, tmp_path)  # the plot is written into the run folder
    out = ok(launch(["plot", run], cwd=tmp_path)).stdout.strip()
    png = (run / "curves.png").read_bytes()
    assert out == str(run / "curves.png") and png.startswith(b"\x89PNG") and len(png) > 10_000


def test_lr_find_suggests_an_lr_from_a_range_test_and_draws_its_curve(tiny, tmp_path):
    """LeNet on the tiny data: 100 steps whose LR grows exponentially from 1e-7 to 10; the line
    suggests an LR in [1e-4, 1e-1], and the curve is in the run's folder."""
    out = ok(launch(["lr-find", LENET, *tiny, "trackers=[]"], cwd=tmp_path)).stdout.strip().splitlines()[-1]
    run = only_run(tmp_path / "runs")
    assert out.startswith("suggested optim.lr=") and out.endswith(f" | the curve: {run / 'lr_find.png'} | run {run}")
    assert 1e-4 <= float(out.split()[1].split("=")[1]) <= 1e-1
    lrs = [r["lr"] for r in records(run, "train")]
    assert len(lrs) == 100 and lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10 * 10 ** (-8 / 100))
    assert all(b / a == pytest.approx(10 ** (8 / 100)) for a, b in zip(lrs, lrs[1:]))  # one factor every step
    assert (run / "lr_find.png").read_bytes().startswith(b"\x89PNG")


def test_code_snapshot_records_the_git_commit_and_changes(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copy(LENET, repo / "lenet.py")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for command in (["init", "-q"], ["add", "lenet.py"], ["commit", "-qm", "start"]):
        subprocess.run([*git, *command], cwd=repo, check=True)
    with open(repo / "lenet.py", "a") as f:
        f.write("\n# an uncommitted change\n")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    data = make_mnist(tmp_path / "mnist", n_train=300, n_test=100)
    ok(launch([repo / "lenet.py", "epochs=0", "data.download=false", f"data.root={data}", "data.val_size=100",
               f"output_dir={tmp_path / 'runs'}"], cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    assert (run / "git.txt").read_text().strip() == commit
    assert "+# an uncommitted change" in (run / "git.diff").read_text()


# ---------------------------------------------------------------------------------------------
# Notifications

class SMTP(socketserver.StreamRequestHandler):
    """Just enough SMTP to receive one message: EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT."""

    def reply(self, text):
        self.wfile.write(f"{text}\r\n".encode())

    def handle(self):
        self.reply("220 localhost ESMTP")
        lines, data = [], False
        for raw in self.rfile:
            text = raw.decode().rstrip("\r\n")
            if data:
                if text == ".":
                    self.server.messages.append("\n".join(lines))
                    data = False
                    self.reply("250 queued")
                else:
                    lines.append(text[1:] if text.startswith("..") else text)
                continue
            command = text.split(" ")[0].upper()
            if command == "EHLO":
                self.reply("250-localhost")
                self.reply("250 AUTH PLAIN")
            elif command == "AUTH":
                self.server.logins.append(base64.b64decode(text.split()[-1]).split(b"\0")[1:])
                self.reply("235 ok")
            elif command == "DATA":
                data, lines = True, []
                self.reply("354 go on")
            elif command == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 ok")


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_notifications_by_email_and_webhook_keep_the_password_out(tiny, tmp_path):
    smtp = serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), SMTP))
    smtp.messages, smtp.logins = [], []
    hook = serve(http.server.HTTPServer(("127.0.0.1", 0), Hook))
    hook.posts = []
    password = "hunter2-not-in-any-file"
    try:
        ok(launch([LENET, *tiny, "epochs=1", "notify.email=me@example.com", "notify.smtp_host=127.0.0.1",
                   f"notify.smtp_port={smtp.server_address[1]}", "notify.smtp_user=alice",
                   f"notify.webhook=http://127.0.0.1:{hook.server_address[1]}/hook"],
                  cwd=tmp_path, env={"SMTP_PASSWORD": password}))
    finally:
        smtp.shutdown()
        hook.shutdown()
    run = only_run(tmp_path / "runs")
    (raw,) = smtp.messages
    message = email.message_from_string(raw, policy=email.policy.default)
    assert message["Subject"] == f"[minloop] finished: {run}" and message["To"] == "me@example.com"
    assert message.get_content().startswith("test accuracy=")
    assert smtp.logins == [[b"alice", password.encode()]]
    (post,) = hook.posts
    assert post["text"].startswith(f"[minloop] finished: {run}")
    for path in run.rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------
# The second recipe

@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return make_cifar10(tmp_path_factory.mktemp("cifar"))


def test_resnet_cifar_learns_on_tiny_data(cifar_root, tmp_path):
    ok(launch([RESNET, f"data.root={cifar_root}", "data.download=false", "data.val_size=100", "depth=8",
               "batch_size=32", "epochs=4", "precision=no", "channels_last=false", "trackers=[]",
               f"output_dir={tmp_path}"], cwd=tmp_path, timeout=300))
    final = summary(only_run(tmp_path))
    assert final["test"]["samples"] == 200 and final["test"]["accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_fast_run_of_resnet_cifar_on_two_processes(cifar_root, tmp_path):
    """debug.fast_run: one optimizer step, one val and one test batch per rank, a checkpoint saved
    and loaded back; with BatchNorm buffers, on 2 processes."""
    result = ok(launch_two([RESNET, f"data.root={cifar_root}", "data.download=false", "data.val_size=100", "depth=8",
                            "precision=no", "debug.fast_run=true", "eval_batch_size=32", "trackers=[]",
                            f"output_dir={tmp_path}"], cwd=tmp_path, timeout=300))
    final = summary(only_run(tmp_path))
    assert final["status"] == "finished" and final["steps"] == 1
    assert final["val"]["samples"] == final["test"]["samples"] == 2 * 32  # of 100 and 200
    assert "checkpoint saved and loaded back" in result.stderr


def test_cifar_augmentation_crops_flips_and_depends_on_the_batch(cifar_root):
    module = recipe.load(RESNET)
    from toolkit import config

    cfg = config.resolve(module.config, [], [f"data.root={cifar_root}", "data.download=false", "data.val_size=100"])
    train = module.datasets(cfg)["train"]
    x1, _ = train.__getitems__([0, 1, 2, 3])
    x2, _ = train.__getitems__([0, 1, 2, 3])
    x3, _ = train.__getitems__([0, 5, 6, 7])
    assert x1.shape == (4, 3, 32, 32) and torch.equal(x1, x2)  # a function of the batch: resumable
    assert not torch.equal(x1[0], x3[0])  # the same image in another batch gets another crop/flip

    # Each augmented image is a 32x32 window of the zero-padded original, mirrored or not.
    images = train.tensors[0][:4]
    padded = torch.nn.functional.pad((images.float() / 255 - module.module.MEAN) / module.module.STD, (4, 4, 4, 4),
                                     value=float("nan"))
    for i in range(4):
        windows = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(_same(w, x1[i]) or _same(w.flip(2), x1[i]) for w in windows), i


def _same(window, image):
    """`image` equals `window`, where the padding (NaN in the window) shows as normalised zeros."""
    mask = ~torch.isnan(window)
    return torch.allclose(window[mask], image[mask], atol=1e-5)


def test_wandb_follows_its_environment_and_an_explicit_key_wins(tiny, tmp_path):
    """1. WANDB_MODE=offline, no key set: the run logs offline (no account needed). 2. The same
    environment with wandb.mode=online: the key wins, and without credentials that is one line
    naming the fixes, before any run folder is made."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path), "WANDB_API_KEY": "",
           "NETRC": str(tmp_path / "no-netrc")}
    args = [LENET, *tiny, "epochs=1", "limit_batches.train=2", "trackers=[tensorboard, wandb]"]
    ok(launch([*args, f"output_dir={tmp_path / 'offline'}"], cwd=tmp_path, env=env))
    assert list((only_run(tmp_path / "offline") / "wandb").glob("offline-run-*"))

    refused = launch([*args, "wandb.mode=online", f"output_dir={tmp_path / 'online'}"], cwd=tmp_path, env=env)
    assert refused.returncode == 2
    assert refused.stderr == ("error: trackers has wandb in online mode, but no wandb credentials were found: run "
                              "`wandb login`, set WANDB_API_KEY, or use wandb.mode=offline (or WANDB_MODE=offline) "
                              "to log without an account\n")
    assert not (tmp_path / "online").exists()
