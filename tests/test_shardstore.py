"""The encoder processes a generation on one machine hands its shards to
(vae_ray/shardstore.py): the same files as writing them here, errors raised
in the command, and a script without a main guard is not run again."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from vae_ray.errors import UserError
from vae_ray.shardstore import EncoderPool, store_shard


def _shard(root, shard: int, fmt: str = "parquet"):
    images = np.full((5, 4, 4, 1), shard, dtype=np.uint8)
    names = [f"part-{shard:05d}.parquet"] if fmt == "parquet" else [f"{shard:05d}/{i:09d}.png" for i in range(5)]
    indices = np.arange(shard * 5, shard * 5 + 5)
    return str(root), fmt, names, images, np.zeros(5, dtype=np.int64), indices, None, {"shard": shard, "images": 5}


@pytest.mark.parametrize("fmt", ["parquet", "png"])
def test_the_pool_writes_what_store_shard_writes_here(tmp_path, fmt):
    here, pooled = tmp_path / "here", tmp_path / "pool"
    expected = {s: store_shard(*_shard(here, s, fmt)) for s in range(4)}
    got = {}
    with EncoderPool(2) as pool:
        for s in range(4):
            got |= {shard: checksum for shard, _, checksum in pool.submit(s, 5, *_shard(pooled, s, fmt))}
        got |= {shard: checksum for shard, _, checksum in pool.finish()}
    assert got == expected

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(here) == files(pooled) and len(files(here)) == (8 if fmt == "parquet" else 24)
    assert json.loads((pooled / ".progress" / "00003.json").read_text())["sha256"] == expected[3]


def test_an_encoders_error_is_raised_in_the_command_and_the_pool_stops(tmp_path):
    (tmp_path / "part-00001.parquet").mkdir()  # in the way of shard 1's file
    with pytest.raises((OSError, UserError)), EncoderPool(2) as pool:
        for s in range(3):
            pool.submit(s, 5, *_shard(tmp_path, s))
        pool.finish()
    assert all(w.poll() is not None for w in pool.workers)
    assert not (tmp_path / ".progress" / "00001.json").exists()


def test_a_killed_encoder_is_an_error_not_a_hang(tmp_path):
    with pytest.raises(RuntimeError, match="encoder process failed on shard 0"), EncoderPool(1) as pool:
        pool.workers[0].kill()
        pool.workers[0].wait()
        pool.submit(0, 5, *_shard(tmp_path, 0))
        pool.finish()


@pytest.mark.subprocess
def test_a_script_without_a_main_guard_is_not_run_again(tmp_path):
    # multiprocessing's spawn would import the script again in every encoder.
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))!r})
            from tests.test_shardstore import _shard
            from vae_ray.shardstore import EncoderPool
            print("started", flush=True)
            with EncoderPool(2) as pool:
                for s in range(3):
                    pool.submit(s, 5, *_shard({str(tmp_path / "out")!r}, s))
                print(sorted(shard for shard, _, _ in pool.finish()), flush=True)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("started") == 1, done.stdout
    assert len(list((tmp_path / "out" / ".progress").glob("*.json"))) == 3


@pytest.mark.subprocess
def test_encoders_die_with_the_command(tmp_path):
    # Killed outright (the OOM killer), the command cannot stop its encoders: the kernel does.
    script = textwrap.dedent(
        """
        import os, signal, sys
        from vae_ray.shardstore import EncoderPool
        pool = EncoderPool(2)
        print(" ".join(str(w.pid) for w in pool.workers), flush=True)
        sys.stdin.readline()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    time.sleep(1.0)  # the encoders are up and have asked for the signal
    parent.stdin.write("\n")
    parent.stdin.flush()
    parent.wait(timeout=30)

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_an_error_that_cannot_travel_is_still_reported():
    from vae_ray.shardstore import _portable

    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}/{b}")

    travelled = _portable(Odd(1, 2))
    assert isinstance(travelled, RuntimeError) and "Odd: 1/2" in str(travelled)
    assert isinstance(_portable(OSError(28, "No space left on device")), OSError)


# ---------------------------------------------------------------------------
# The table of formats (genplan.SET_FORMATS)
# ---------------------------------------------------------------------------
def test_every_format_has_an_encoder_and_names_its_shards_one_way():
    from vae_ray.destination import Layout
    from vae_ray.genplan import FORMATS, SET_FORMATS, Plan, shard_files
    from vae_ray.shardstore import ENCODERS

    assert set(FORMATS) == set(SET_FORMATS) == set(ENCODERS)
    for name, fmt in SET_FORMATS.items():
        plan = Plan(num=25, seed=0, format=name, temperature=1.0, labels="none", checkpoint_sha256="0", shard_size=10)
        layout = Layout(plan, ())
        names = [rel for shard in range(plan.num_shards) for rel in shard_files(plan, shard, [])]
        assert len(names) == (25 if fmt.per_image else 3) and len(set(names)) == len(names)
        assert all(layout.owns(rel) for rel in names)  # what a shard writes, the set owns
        if fmt.per_image:
            assert fmt.shard_of(names[0]) is None
            continue
        assert [fmt.shard_of(rel) for rel in names] == [0, 1, 2]
        # a fourth shard, another format's file or another shard count is not this set's
        assert not layout.owns(fmt.shard_file(3, 3))
        if "{shards}" in fmt.file:
            assert not layout.owns(fmt.shard_file(0, 4))
        other = next(f for f in SET_FORMATS.values() if f.file and f.file != fmt.file)
        assert fmt.shard_of(other.shard_file(0, 3)) is None and not layout.owns(other.shard_file(0, 3))


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-per-file"])
def test_a_png_shards_files_are_flushed_before_its_folder_takes_its_name(tmp_path, monkeypatch, syncfs):
    """A shard's marker is written after its folder is renamed into place:
    the files must be durable by then (one syncfs on Linux, else an fsync each)."""
    from vae_ray import shardstore

    seen = []
    real = shardstore.flush_folder

    def spy(folder):
        seen.append((folder.name, sorted(p.name for p in folder.iterdir()), (tmp_path / "00000").exists()))
        real(folder)

    monkeypatch.setattr(shardstore, "flush_folder", spy)
    if not syncfs:
        monkeypatch.setattr(shardstore, "_syncfs", lambda: None)
    shardstore.write_folder(str(tmp_path), "00000", {"a.png": b"1", "b.png": b"2"})
    [(name, files, target_existed)] = seen
    assert name.startswith(".tmp-") and files == ["a.png", "b.png"] and not target_existed
    assert sorted(p.name for p in (tmp_path / "00000").iterdir()) == ["a.png", "b.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["00000"]
