"""Locks, pointers and appends that touch only what is theirs: a lock name
planted as a link (or anything but a lock file) is refused with nothing
touched, a pointer never leads out of its folder, a torn tail of any length
costs no complete record, and an S3 lock taken over is known to be lost."""

import json
import os
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from vae_ray import storage
from vae_ray.cli import app
from vae_ray.errors import UserError

from conftest import assert_one_error_line

runner = CliRunner()


# ---------------------------------------------------------------------------
# Local locks: the lock name is a lock file we can prove is ours, or refused
# ---------------------------------------------------------------------------
def _lock_in_thread(out: str) -> BaseException | None:
    """Take and release the lock of `out` in a thread: a lock name that made
    the open block (a FIFO) fails the test instead of hanging it."""
    outcome: list = []

    def attempt():
        try:
            with storage.Lock(out, "vae-ray test"):
                pass
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome, "taking the lock hung"
    return outcome[0]


def _snapshot(path) -> tuple:
    """What a name is and holds, without following it."""
    st = os.lstat(path)
    body = os.readlink(path) if os.path.islink(path) else (path.read_bytes() if path.is_file() else None)
    return st.st_ino, st.st_mode, st.st_nlink, body


def _plant(kind: str, lock, victim):
    """A `.OUT.lock` that is not a lock file vae-ray made; returns what must stay as it is."""
    victim.parent.mkdir(exist_ok=True)
    if kind == "link to a file":
        victim.write_text("precious\n")
        lock.symlink_to(victim)
    elif kind == "link to a folder":
        victim.mkdir()
        (victim / "keep.txt").write_text("precious\n")
        lock.symlink_to(victim, target_is_directory=True)
    elif kind == "dangling link":
        lock.symlink_to(victim)
    elif kind == "hard link":
        victim.write_text("precious\n")
        os.link(victim, lock)
    elif kind == "FIFO":
        os.mkfifo(lock)
    elif kind == "folder":
        lock.mkdir()
        (lock / "keep.txt").write_text("precious\n")
    elif kind == "file that is not a lock":
        lock.write_text("my notes, not a lock\n")


PLANTED = [
    "link to a file",
    "link to a folder",
    "dangling link",
    "hard link",
    "FIFO",
    "folder",
    "file that is not a lock",
]


@pytest.mark.parametrize("kind", PLANTED)
def test_a_lock_name_that_is_not_our_lock_file_is_refused_with_nothing_touched(tmp_path, kind):
    out = tmp_path / "shared" / "OUT"
    lock = tmp_path / "shared" / ".OUT.lock"
    victim = tmp_path / "home" / "victim"
    lock.parent.mkdir()
    _plant(kind, lock, victim)
    before_lock = _snapshot(lock)
    before_victim = _snapshot(victim) if os.path.lexists(victim) else None
    before_inside = sorted(p.name for p in victim.iterdir()) if victim.is_dir() else None

    error = _lock_in_thread(str(out))

    assert isinstance(error, UserError), repr(error)
    assert str(lock) in str(error) and "\n" not in str(error)
    assert _snapshot(lock) == before_lock  # not truncated, not removed, not replaced
    if before_victim is None:
        assert not os.path.lexists(victim)  # a dangling link's target is never created
    else:
        assert _snapshot(victim) == before_victim
    if before_inside is not None:
        assert sorted(p.name for p in victim.iterdir()) == before_inside
        assert (victim / "keep.txt").read_text() == "precious\n"
    assert not os.path.lexists(out)


def test_the_cli_refuses_a_planted_lock_link_in_one_line_and_keeps_the_victim(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file\n")
    (shared / ".OUT.lock").symlink_to(victim)
    result = runner.invoke(app, ["data", "prepare", "synthetic", "--limit", "10", "--out", str(shared / "OUT")])
    assert_one_error_line(result, str(shared / ".OUT.lock"))
    assert victim.read_text() == "another user's file\n"
    assert os.readlink(shared / ".OUT.lock") == str(victim)
    assert sorted(p.name for p in shared.iterdir()) == [".OUT.lock"]


def test_a_killed_holders_lock_file_is_reused_and_removed_on_release(tmp_path):
    out = tmp_path / "OUT"
    left = {"command": "vae-ray generate", "pid": 1, "host": "gone", "since": "then", "heartbeat": 0, "token": "old"}
    (tmp_path / ".OUT.lock").write_text(json.dumps(left))
    with storage.Lock(str(out), "vae-ray test") as lock:
        mine = json.loads((tmp_path / ".OUT.lock").read_text())
        assert mine["command"] == "vae-ray test" and mine["token"] == lock.token
        lock.ensure_held()
    assert not (tmp_path / ".OUT.lock").exists()
    (tmp_path / ".OUT.lock").write_text("")  # killed between creating and writing it
    with storage.Lock(str(out)):
        pass
    assert not (tmp_path / ".OUT.lock").exists()


def test_release_removes_only_the_lock_file_it_locked(tmp_path):
    out = str(tmp_path / "OUT")
    lock_file = tmp_path / ".OUT.lock"
    with storage.Lock(out, "vae-ray first") as first:
        lock_file.unlink()  # someone removed it by hand ...
        with storage.Lock(out, "vae-ray second") as second:  # ... so a second writer could start
            with pytest.raises(
                UserError, match=r"lost the lock on .*OUT to `vae-ray second` \(pid \d+ on .*\); stopping$"
            ):
                first.ensure_held()
            first.release()
            assert json.loads(lock_file.read_text())["command"] == "vae-ray second"  # not the first's to remove
            second.ensure_held()
    assert not lock_file.exists()


def test_readers_share_the_lock_file_and_keep_a_writer_out(tmp_path):
    out = str(tmp_path / "d")
    lock_file = tmp_path / ".d.lock"
    with (
        storage.Lock(out, "vae-ray train", shared=True),
        storage.Lock(out, "vae-ray train", shared=True),  # readers share
        pytest.raises(UserError, match="in use"),
        storage.Lock(out, "vae-ray data prepare"),
    ):
        pass
    assert lock_file.read_bytes() == b""  # readers write nothing and leave it for a writer
    with (
        storage.Lock(out, "vae-ray data prepare"),
        pytest.raises(UserError, match="in use by `vae-ray data prepare`"),
        storage.Lock(out, shared=True),
    ):
        pass
    assert not lock_file.exists()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    lock_file.symlink_to(victim)
    with pytest.raises(UserError, match=r"\.d\.lock: not a vae-ray lock file \(is a symbolic link\)"):
        storage.Lock(out, shared=True).__enter__()
    assert victim.read_text() == "mine" and lock_file.is_symlink()


# ---------------------------------------------------------------------------
# Pointers never lead out of their folder
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["/etc", "/", "../other-run/checkpoint_epoch_0001", "a/../../x", ".."])
def test_a_local_pointer_that_leaves_its_folder_is_no_pointer(tmp_path, target):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / "latest")
    assert storage.read_pointer(str(run), "latest") is None


def test_pointers_we_write_are_read_back_and_unsafe_ones_are_never_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    storage.set_pointer(str(run), "best", "trials/t_0001/checkpoint_epoch_0003")
    assert storage.read_pointer(str(run), "best") == "trials/t_0001/checkpoint_epoch_0003"
    for bad in ("/etc", "../x", "a/../../x", ""):
        with pytest.raises(ValueError):
            storage.set_pointer(str(run), "best", bad)
    assert os.readlink(run / "best") == "trials/t_0001/checkpoint_epoch_0003"
    assert sorted(p.name for p in run.iterdir()) == ["best"]


# ---------------------------------------------------------------------------
# Append recovery never loses a complete record
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("torn", [10, 65535, 65536, 65537, 200_000])
@pytest.mark.parametrize("records", [0, 1, 3])
def test_a_torn_tail_of_any_length_costs_no_complete_record(tmp_path, torn, records):
    path = tmp_path / "metrics.jsonl"
    complete = b"".join(json.dumps({"epoch": e}).encode() + b"\n" for e in range(1, records + 1))
    path.write_bytes(complete + b'{"epoch": 9, "loss": "' + b"x" * torn)  # an append cut short
    storage.append_jsonl(str(path), {"epoch": records + 1})
    assert path.read_bytes() == complete + json.dumps({"epoch": records + 1}).encode() + b"\n"


def test_a_last_record_missing_only_its_newline_is_kept_locally_and_on_s3(tmp_path, s3_bucket):
    for uri in (str(tmp_path / "metrics.jsonl"), f"s3://{s3_bucket}/torn/metrics.jsonl"):
        storage.write_bytes(uri, b'{"epoch": 1}\n{"epoch": 2}')  # cut just before the newline
        assert storage.read_jsonl(uri) == [{"epoch": 1}, {"epoch": 2}]  # readers count it ...
        storage.append_jsonl(uri, {"epoch": 3})  # ... so the next append keeps it
        assert storage.read_bytes(uri) == b'{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n', uri
        storage.write_bytes(uri, b'{"epoch": 1}\n{"epoch": 2, "x": "' + b"y" * 100_000)  # a long torn tail
        storage.append_jsonl(uri, {"epoch": 2})
        assert storage.read_bytes(uri) == b'{"epoch": 1}\n{"epoch": 2}\n', uri


def test_metrics_written_through_a_link_are_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("no newline at the end")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UserError, match="metrics.jsonl"):
        storage.append_jsonl(str(tmp_path / "metrics.jsonl"), {"epoch": 1})
    assert victim.read_text() == "no newline at the end"


# ---------------------------------------------------------------------------
# S3 locks: takeover and heartbeat are conditional on what was read
# ---------------------------------------------------------------------------
def _stale(uri: str, token: str = "old") -> None:
    storage.write_json(
        storage.lock_uri(uri),
        {"command": "vae-ray dead", "pid": 1, "host": "gone", "since": "then", "heartbeat": 0, "token": token},
    )


def test_two_waiters_taking_over_one_stale_lock_exactly_one_wins(s3_bucket, monkeypatch):
    out = f"s3://{s3_bucket}/stale/set"
    _stale(out)
    second: dict = {}
    real_warn = storage.warn_user

    def second_waiter_overtakes(text):
        # The first waiter has read the stale lock and is about to take it
        # over: a second one, which read it too, takes it over first.
        real_warn(text)
        if not second:
            second["started"] = True
            second["lock"] = storage.Lock(out, "vae-ray second").__enter__()

    monkeypatch.setattr(storage, "warn_user", second_waiter_overtakes)
    with pytest.raises(UserError, match="in use by `vae-ray second`"):
        storage.Lock(out, "vae-ray first").__enter__()
    lock = second["lock"]
    assert storage.read_json(storage.lock_uri(out))["token"] == lock.token
    lock.ensure_held()
    lock.release()
    assert not storage.exists(storage.lock_uri(out))


def test_a_holder_taken_over_stops_its_heartbeat_and_is_told(s3_bucket):
    out = f"s3://{s3_bucket}/taken/set"
    old = storage.Lock(out, "vae-ray old")
    old.HEARTBEAT_S = 0.2
    with old:
        new = storage.Lock(out, "vae-ray new")
        new.STALE_S = 0.0  # the old holder's heartbeat looks stale at once
        with new:
            del new.STALE_S  # judged by the usual limit from now on (its own heartbeat is not stale)
            error = _wait_until_lost(old)  # its next heartbeat finds the lock taken over
            assert str(error).startswith(f"lost the lock on {out} to `vae-ray new` (pid {os.getpid()}")
            assert str(error).endswith("; stopping")
            time.sleep(0.5)  # more of its heartbeats would have been due
            assert storage.read_json(storage.lock_uri(out))["token"] == new.token
            new.ensure_held()
            old.release()  # leaves the new holder's lock alone
            assert storage.read_json(storage.lock_uri(out))["token"] == new.token
            storage.ensure_lock_held(out, new.token)  # the check a writer in another process makes
            with pytest.raises(UserError, match="lost the lock on .* to `vae-ray new`"):
                storage.ensure_lock_held(out, old.token)
    assert not storage.exists(storage.lock_uri(out))


def test_a_waiting_writer_takes_over_a_dead_holders_lock_once_it_goes_stale(s3_bucket):
    """A search's trial restarted after its process was killed finds its own
    lock on S3 still fresh; it waits (RunDir.lock(as_trial=True)) instead of failing."""
    out = f"s3://{s3_bucket}/restarted/trial"
    dead = {"command": "vae-ray dead", "pid": 1, "host": "gone", "since": "now", "token": "dead"}
    storage.write_json(storage.lock_uri(out), dead | {"heartbeat": time.time()})  # its last beat: just now
    hasty = storage.Lock(out, "vae-ray tune")
    hasty.STALE_S = 2.0
    with pytest.raises(UserError, match="in use by `vae-ray dead`"):
        hasty.__enter__()
    patient = storage.Lock(out, "vae-ray tune", wait_s=10)
    patient.STALE_S, patient.POLL_S = 2.0, 0.25
    started = time.monotonic()
    with patient:
        assert time.monotonic() - started >= 1.0  # it waited for the dead holder's heartbeat to age
        assert storage.read_json(storage.lock_uri(out))["token"] == patient.token
    assert not storage.exists(storage.lock_uri(out))


def _wait_until_lost(lock: storage.Lock) -> UserError:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            lock.ensure_held()
        except UserError as exc:
            return exc
        time.sleep(0.05)
    pytest.fail("the holder never learnt that it lost the lock")


def test_a_takeover_landing_just_before_a_heartbeat_is_not_overwritten(s3_bucket, monkeypatch):
    out = f"s3://{s3_bucket}/race/set"
    client = storage._boto_client()
    real_put = client.put_object
    raced: list = []

    def takeover_first(**kwargs):
        # The heartbeat's PUT is on its way; a waiter's takeover lands first.
        if "IfMatch" in kwargs and not raced:
            raced.append(True)
            real_put(Bucket=kwargs["Bucket"], Key=kwargs["Key"], Body=json.dumps(USURPER).encode())
        return real_put(**kwargs)

    old = storage.Lock(out, "vae-ray old")
    old.HEARTBEAT_S = 0.1
    with old:
        monkeypatch.setattr(client, "put_object", takeover_first)
        error = _wait_until_lost(old)
        assert str(error).startswith(f"lost the lock on {out} to `vae-ray usurper` (pid 7 on elsewhere")
        assert storage.read_json(storage.lock_uri(out))["token"] == "usurper"
    assert storage.read_json(storage.lock_uri(out))["token"] == "usurper"  # release left it alone


USURPER = {
    "command": "vae-ray usurper",
    "pid": 7,
    "host": "elsewhere",
    "since": "now",
    "heartbeat": 0,
    "token": "usurper",
}


def test_without_boto3_the_lock_falls_back_to_check_then_put(s3_bucket, monkeypatch):
    monkeypatch.setitem(sys.modules, "botocore", None)  # `import botocore...` raises ImportError
    monkeypatch.setitem(sys.modules, "botocore.exceptions", None)
    out = f"s3://{s3_bucket}/fallback/set"
    with storage.Lock(out, "vae-ray one") as one:
        with pytest.raises(UserError, match="in use by `vae-ray one`"), storage.Lock(out):
            pass
        one.ensure_held()
    assert not storage.exists(storage.lock_uri(out))
    _stale(out)
    old = storage.Lock(out, "vae-ray old")
    old.HEARTBEAT_S = 0.1
    with old:
        storage.write_json(storage.lock_uri(out), USURPER)  # taken over between two heartbeats
        assert "to `vae-ray usurper`" in str(_wait_until_lost(old))
    assert storage.read_json(storage.lock_uri(out))["token"] == "usurper"


# ---------------------------------------------------------------------------
# A writer that lost its lock stops before its next write
# ---------------------------------------------------------------------------
def test_a_generation_whose_lock_was_taken_never_calls_its_set_complete(tmp_path):
    from vae_ray.destination import MANIFEST
    from vae_ray.generate import Generation

    from conftest import make_checkpoint

    run = make_checkpoint(tmp_path / "run")
    out = tmp_path / "set"
    job = Generation(str(run), num=20, out=str(out))
    lock_file = tmp_path / ".set.lock"

    def take_over(done: int, total: int) -> None:
        if done == 0:  # after the first check: another writer takes the lock over (a stale-lock takeover)
            lock_file.unlink()
            lock_file.write_text(json.dumps({"command": "vae-ray other", "pid": 1, "token": "theirs"}))

    with pytest.raises(UserError, match="lost the lock on .*set"):
        job.run(progress=take_over)
    assert json.loads((out / MANIFEST).read_text())["status"] == "running"  # not "complete"
    assert json.loads(lock_file.read_text())["token"] == "theirs"  # and the new holder's lock stays
