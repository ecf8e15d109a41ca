"""Every promise about files, tried the way a careless user or a hostile
dataset would: reruns, --overwrite, names from data, links, locks, torn
files, interruption, unbounded input, and the one-line error contract."""

import gzip
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vae_ray.cli import app
from vae_ray.destination import MANIFEST, verify
from vae_ray.errors import UserError

from conftest import (
    assert_one_error_line,
    assert_process_error_line,
    make_checkpoint,
    vae_ray_exe,
    write_cifar_batches,
    write_fake_idx_dataset,
)

runner = CliRunner()


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------
# Idempotent reruns, and only deleting what we wrote
# ---------------------------------------------------------------------------
@pytest.mark.smoke
def test_a_rerun_of_a_finished_generation_touches_nothing(tmp_path):
    run = make_checkpoint(tmp_path / "run")
    args = ["generate", str(run), "--num", "25", "--out", str(tmp_path / "set")]
    assert runner.invoke(app, args).exit_code == 0
    before = _snapshot(tmp_path / "set")
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already holds these 25 images; nothing to do" in again.output
    assert _snapshot(tmp_path / "set") == before  # every file's inode and mtime unchanged
    verify(str(tmp_path / "set"))


def test_overwrite_replaces_only_our_own_artefacts(tmp_path, tiny_data):
    run = make_checkpoint(tmp_path / "run")
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("months of work")
    for args, words in [
        (
            ["data", "prepare", "synthetic", "--limit", "10", "--overwrite", "--out", str(foreign)],
            "not a vae-ray dataset",
        ),
        (["generate", str(run), "--num", "5", "--overwrite", "--out", str(foreign)], "not a generated set"),
        (["generate", str(run), "--num", "5", "--overwrite", "--out", str(run)], "holds the checkpoint"),
        (["report", str(run), "--out", str(foreign)], "not a vae-ray report"),
        (["train", "--data", str(tiny_data), "--out", str(foreign)], "holds other files, not a vae-ray run"),
    ]:
        assert_one_error_line(runner.invoke(app, args), *([words] if isinstance(words, str) else words))
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    assert (foreign / "thesis.tex").read_text() == "months of work"
    assert (run / "latest" / "model.safetensors").is_file()


@pytest.mark.ray
def test_nothing_is_deleted_before_the_checks_pass(ray_cluster, tmp_path):
    run = make_checkpoint(tmp_path / "run")
    out = tmp_path / "set"
    assert runner.invoke(app, ["generate", str(run), "--num", "12", "--out", str(out)]).exit_code == 0
    before = _snapshot(out)
    # --overwrite with another seed on GPU actors, on a cluster without GPUs: refused before anything changes.
    failed = runner.invoke(
        app, ["generate", str(run), "--num", "12", "--seed", "4", "--overwrite", "--gpu", "--out", str(out)]
    )
    assert_one_error_line(failed, "--gpu asks for GPU actors")
    assert _snapshot(out) == before
    verify(str(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left either
    replaced = runner.invoke(
        app, ["generate", str(run), "--num", "12", "--seed", "4", "--overwrite", "--out", str(out)]
    )
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / MANIFEST).read_text())["seed"] == 4 and verify(str(out))["count"] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------
# Names from data are data
# ---------------------------------------------------------------------------
HOSTILE = ["..", "a/b", "/etc", "_manifest.json", ".hidden", "A", "a", "..\\..\\win", "x" * 300, "ok"]


def test_hostile_class_names_cannot_leave_the_destination(tmp_path):
    run = make_checkpoint(tmp_path / "run", conditional=True, classes=HOSTILE)
    out = tmp_path / "area" / "set"
    result = runner.invoke(app, ["generate", str(run), "--num", "30", "--per-class", "--out", str(out)])
    assert result.exit_code == 0, result.output
    inside = [p for p in (tmp_path / "area").rglob("*")]
    assert all(out in p.parents or p == out for p in inside)
    assert sorted(p.name for p in (tmp_path / "area").iterdir()) == ["set"]
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(folders) == 10 and all("/" not in f and not f.startswith((".", "_")) and len(f) <= 64 for f in folders)
    manifest = json.loads((out / MANIFEST).read_text())
    assert list(manifest["class_folders"]) == HOSTILE  # the real names, beside their folders
    assert sum(1 for _ in out.rglob("*.png")) == 30
    verify(str(out))


def test_a_hostile_batches_meta_is_kept_as_data(tmp_path):
    names = [b"../../escape", b"/abs", b"a/b", b"[bold]x[/]", b"c4", b"c5", b"c6", b"c7", b"c8", b"c9"]
    write_cifar_batches(tmp_path / "c", per_batch=2, names=names)
    result = runner.invoke(
        app, ["data", "prepare", "cifar10", "--source", str(tmp_path / "c"), "--out", str(tmp_path / "d")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["classes"][:4] == [
        "../../escape",
        "/abs",
        "a/b",
        "[bold]x[/]",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d"]
    shown = runner.invoke(app, ["data", "show", str(tmp_path / "d")])
    assert shown.exit_code == 0 and "[bold]x[/]" in shown.output  # printed literally, not as markup


def test_links_out_of_an_image_folder_are_refused(tmp_path):
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    Image.new("L", (8, 8), 200).save(secret / "private.png")
    root = tmp_path / "pets"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 10 * i).save(root / cls / f"{i}.png")
    (root / "cat" / "inside.png").symlink_to(root / "dog" / "0.png")  # a link within the tree is fine
    args = ["data", "prepare", "imagefolder", "--source", str(root), "--test-fraction", "0.5"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "ok")]).exit_code == 0
    (root / "dog" / "stolen.png").symlink_to(secret / "private.png")
    assert_one_error_line(
        runner.invoke(app, [*args, "--out", str(tmp_path / "a")]), "stolen.png", "a link out of the source folder"
    )
    (root / "dog" / "stolen.png").unlink()
    (root / "fish").symlink_to(secret, target_is_directory=True)
    assert_one_error_line(
        runner.invoke(app, [*args, "--out", str(tmp_path / "b")]), "fish", "a link out of the source folder"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------
@pytest.mark.subprocess
def test_two_generates_into_one_folder_end_with_one_verifiable_set(tmp_path):
    run = make_checkpoint(tmp_path / "run")
    out = tmp_path / "set"
    command = [vae_ray_exe(), "generate", str(run), "--num", "10000", "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / ".set.lock").exists() and time.time() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    second = subprocess.run(command, capture_output=True, text=True)
    assert_process_error_line(second, "in use by `vae-ray generate`", f"pid {first.pid}")
    assert time.monotonic() - started < 15  # fails at once, does not wait
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert verify(str(out))["count"] == 10000


@pytest.mark.ray
@pytest.mark.subprocess
def test_sigterm_ends_training_with_143_and_no_stray_processes(tiny_data, tmp_path, request):
    ray_tmp = Path(tempfile.mkdtemp(prefix="vrs-"))  # short: Ray's socket paths must fit in 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    run = tmp_path / "run"
    command = [
        vae_ray_exe(),
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(run),
        "--latent-dim",
        "4",
        "--batch-size",
        "16",
        "--epochs",
        "40",
    ]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.2)
    assert (run / "metrics.jsonl").is_file(), proc.stderr.read() if proc.poll() is not None else "no epoch"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert "continue it with --resume" in proc.stderr.read()
    time.sleep(2)
    leftovers = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout.split()
    assert not leftovers, "the command left Ray processes behind"
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 40  # kept for --resume


# ---------------------------------------------------------------------------
# Bounded by design
# ---------------------------------------------------------------------------
@pytest.mark.subprocess
def test_a_gzip_bomb_fails_fast_with_bounded_memory(tmp_path):
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    header = struct.pack(">BBBBIII", 0, 0, 8, 3, 100, 28, 28)  # promises 78 KB ...
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(header)
        zeros = bytes(1 << 20)
        for _ in range(400):  # ... and inflates to 400 MB
            fh.write(zeros)
    assert bomb.stat().st_size < 2_000_000
    # The peak resident size of the reading process itself (VmHWM starts afresh at exec).
    probe = (
        "import sys; from vae_ray.sources.idx import read_idx; from vae_ray.errors import UserError\n"
        "try:\n    read_idx(__import__('pathlib').Path(sys.argv[1]))\nexcept UserError as e:\n    print(e)\n"
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, timeout=60)
    message, peak_kb = done.stdout.strip().splitlines()
    assert "more than 78400" in message and "truncated or corrupt" in message
    assert int(peak_kb) < 200_000 and time.monotonic() - started < 20


def test_idx_headers_and_archives_are_bounded(tmp_path, monkeypatch):
    from vae_ray.sources import locate
    from vae_ray.sources.idx import read_idx

    huge = tmp_path / "huge"
    huge.write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 2**31, 2**31, 28))
    with pytest.raises(UserError, match="implausibly large"):
        read_idx(huge)
    big = tmp_path / "big"
    big.write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 3_000_000, 28, 28 * 40))
    with pytest.raises(UserError, match="more than the 2,147,483,648 this reader accepts"):
        read_idx(big)
    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(20):
            info = tarfile.TarInfo(f"set/cls/{i}.png")
            data = io.BytesIO(b"x")
            info.size = 1
            tar.addfile(info, data)
    monkeypatch.setattr(locate, "MAX_ARCHIVE_MEMBERS", 10)
    result = runner.invoke(
        app, ["data", "prepare", "imagefolder", "--source", str(archive), "--out", str(tmp_path / "d")]
    )
    assert_one_error_line(result, "more than 10 members")
    assert not (tmp_path / "d").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_image_sizes_are_bounded_and_truncated_images_skipped(tmp_path):
    root = tmp_path / "big"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (1500, 1500), 80).save(root / cls / f"{i}.png")
    args = ["data", "prepare", "imagefolder", "--source", str(root), "--test-fraction", "0.5"]
    assert_one_error_line(
        runner.invoke(app, [*args, "--out", str(tmp_path / "d1")]), "1500x1500", "pass --image-size (at most 1024)"
    )
    assert runner.invoke(app, [*args, "--image-size", "16", "--out", str(tmp_path / "d2")]).exit_code == 0
    png = root / "a" / "0.png"
    png.write_bytes(png.read_bytes()[:200])  # a header that reads, pixels that do not
    assert_one_error_line(
        runner.invoke(app, [*args, "--image-size", "16", "--out", str(tmp_path / "d3")]),
        "0.png",
        "corrupt or unreadable image",
    )
    skipped = runner.invoke(app, [*args, "--image-size", "16", "--skip-corrupt", "--out", str(tmp_path / "d4")])
    assert skipped.exit_code == 0, skipped.output
    meta = json.loads((tmp_path / "d4" / "dataset.json").read_text())
    assert meta["skipped_corrupt"] == [str(png)]
    assert meta["splits"]["train"]["count"] + meta["splits"]["test"]["count"] == 3


# ---------------------------------------------------------------------------
# One error contract
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["data", "show", "runs/[/x]/[bold red]y"], ["runs/[/x]/[bold red]y", "not a prepared dataset"]),
        (["data", "prepare", "synthetic", "--seed", "-1", "--out", "OUT"], ["--seed"]),
        (["data", "prepare", "synthetic", "--limit", str(10**12), "--out", "OUT"], ["--limit must be between"]),
        (["generate", "RUN", "--num", str(10**15), "--out", "OUT"], ["--num"]),
        (["generate", "RUN", "--temperature", "nan", "--out", "OUT"], ["--temperature must be a finite number"]),
        (["tune", "--data", "DATA", "--out", "OUT", "--lrs", "1e-3,inf"], ["--lrs", "finite"]),
        (["train", "--data", "DATA", "--out", "OUT", "--lr", "inf"], ["lr must be a finite number"]),
        (["train", "--data", "DATA", "--out", "OUT", "--no-such-flag"], ["No such option: --no-such-flag"]),
        (["train", "--data", "DATA", "--out", "OUT", "--epochs", "many"], ["--epochs", "valid integer"]),
        (["evaluate", "RUN", "--iw-samples", "0"], ["--iw-samples must be between 1 and 100000"]),
        # --submit checks every value here, before it contacts any cluster.
        (
            ["train", "--data", "DATA", "--out", "OUT", "--lr", "-1", "--submit", "--address", "http://127.0.0.1:9"],
            ["lr must be a positive number"],
        ),
        (
            ["generate", "RUN", "--out", "OUT", "--temperature", "0", "--submit", "--address", "http://127.0.0.1:9"],
            ["--temperature must be a finite number in (0, 100]"],
        ),
    ],
)
def test_mistakes_are_one_line_with_exit_2(tmp_path, tiny_data, args, words):
    run = make_checkpoint(tmp_path / "run")
    args = [
        a.replace("RUN", str(run)).replace("OUT", str(tmp_path / "o")).replace("DATA", str(tiny_data)) for a in args
    ]
    assert_one_error_line(runner.invoke(app, args), *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.subprocess
def test_a_path_with_markup_in_a_real_process(tmp_path):
    weird = tmp_path / "[/x]" / "[bold]data"
    done = subprocess.run([vae_ray_exe(), "data", "verify", str(weird)], capture_output=True, text=True)
    assert_process_error_line(done, str(weird), "not a prepared dataset")


def test_logs_of_a_shared_cluster_are_never_copied(tmp_path):
    from vae_ray.cluster import Cluster, copy_logs

    logs = tmp_path / "session" / "logs"
    logs.mkdir(parents=True)
    (logs / "job-driver-someone-else.log").write_text("their secrets")
    shared = Cluster(resources={}, private=False, logs_dir=str(logs))
    assert copy_logs(shared, tmp_path / "run" / "ray-logs") is None
    assert not (tmp_path / "run").exists()
    mine = Cluster(resources={}, private=True, logs_dir=str(logs))
    assert (copy_logs(mine, tmp_path / "run" / "ray-logs") / "job-driver-someone-else.log").is_file()


def test_a_fake_idx_dataset_prepares_twice_to_the_same_bytes(tmp_path):
    src = write_fake_idx_dataset(tmp_path / "src", n_train=20, n_test=10)
    args = ["data", "prepare", "mnist", "--source", str(src), "--out", str(tmp_path / "d")]
    assert runner.invoke(app, args).exit_code == 0
    before = _snapshot(tmp_path / "d")
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already holds this dataset" in again.output
    assert _snapshot(tmp_path / "d") == before
    np.testing.assert_equal(len(before) > 3, True)
