"""Files that are never half-written or clobbered: atomic writes, torn appends,
pointers and one-writer locks, locally and on a real S3 server (moto)."""

import json
import multiprocessing
import os
import time

import pytest

from vae_ray import storage
from vae_ray.errors import UserError
from vae_ray.rundir import RunDir


def test_whole_file_writes_leave_no_temporary_files(tmp_path):
    storage.write_json(str(tmp_path / "a.json"), {"x": 1})
    storage.write_json(str(tmp_path / "a.json"), {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_torn_last_line_is_skipped_then_repaired(tmp_path, capsys):
    path = str(tmp_path / "metrics.jsonl")
    storage.append_jsonl(path, {"epoch": 1})
    with open(path, "a") as fh:
        fh.write('{"epoch": 2, "train_lo')  # an append cut short by a kill or a full disk
    assert storage.read_jsonl(path) == [{"epoch": 1}]
    assert "torn last line" in capsys.readouterr().err
    storage.append_jsonl(path, {"epoch": 2})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    with open(path, "a") as fh:
        fh.write("garbage\n")
    storage.append_jsonl(path, {"epoch": 3})
    with pytest.raises(UserError, match="line 3 is not valid JSON"):
        storage.read_jsonl(path)  # damage in the middle is not a torn append: it is reported


def test_unsupported_schemes_never_become_local_paths(tmp_path):
    for uri in ("gs://bucket/runs/r1", "http://host/x", "s3://"):
        with pytest.raises(UserError):
            storage.check_uri(uri)
    assert storage.check_uri("s3://bucket/runs/r1/") == "s3://bucket/runs/r1"
    assert storage.check_uri(str(tmp_path / "x" / ".." / "y")) == str(tmp_path / "y")


def _hold(uri, ready, release):
    with storage.Lock(uri, "vae-ray generate"):
        ready.set()
        release.wait(30)


def test_a_second_writer_fails_at_once_naming_the_holder_and_a_dead_holders_lock_is_free(tmp_path):
    out = str(tmp_path / "set")
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(out, ready, release))
    holder.start()
    assert ready.wait(60)
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"in use by `vae-ray generate` \(pid {holder.pid} on"), storage.Lock(out):
        pass
    assert time.monotonic() - started < 5
    holder.kill()  # a writer killed while holding the lock
    holder.join()
    with storage.Lock(out):  # the kernel released it with its process
        pass
    assert not (tmp_path / ".set.lock").exists()


def test_pointers_are_links_locally_and_objects_on_s3(tmp_path, s3_bucket):
    (tmp_path / "checkpoint_epoch_0002").mkdir()
    storage.set_pointer(str(tmp_path), "latest", "checkpoint_epoch_0002")
    assert os.readlink(tmp_path / "latest") == "checkpoint_epoch_0002"
    remote = f"s3://{s3_bucket}/pointers/run"
    storage.set_pointer(remote, "latest", "checkpoint_epoch_0007")
    assert storage.read_pointer(remote, "latest") == "checkpoint_epoch_0007"
    assert RunDir(remote).latest() == f"{remote}/checkpoint_epoch_0007"
    storage.write_text(f"{remote}/evil/latest", "../../etc\n")
    assert storage.read_pointer(f"{remote}/evil", "latest") is None  # only pointers we could have written


def test_s3_lock_is_a_conditional_create(s3_bucket):
    out = f"s3://{s3_bucket}/locked/set"
    with (
        storage.Lock(out, "vae-ray tune"),
        pytest.raises(UserError, match="in use by `vae-ray tune`"),
        storage.Lock(out),
    ):
        pass
    with storage.Lock(out):  # released
        pass
    # A lock whose holder stopped its heartbeat long ago belongs to a dead process: taken over.
    storage.write_json(
        storage.lock_uri(out),
        {"command": "vae-ray generate", "pid": 1, "host": "gone", "heartbeat": time.time() - 3600, "token": "old"},
    )
    with storage.Lock(out):
        assert storage.read_json(storage.lock_uri(out))["token"] != "old"
