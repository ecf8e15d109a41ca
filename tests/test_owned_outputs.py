"""What `generate` and `report` may replace, resume or delete: only what they
can prove they wrote (issue #27). Hidden names count, a manifest alone proves
nothing, manifests are checked before they are believed, a swap cut short by a
crash is settled by the next command, and a set that cannot fit is refused
before the first write. Everything here runs without Ray (one-shard jobs run in
this process)."""

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vae_ray import destination, storage
from vae_ray import generate as generation
from vae_ray.cli import app
from vae_ray.destination import MANIFEST, read_manifest, verify
from vae_ray.errors import UserError
from vae_ray.generate import generate
from vae_ray.genplan import check_options, class_folders

from conftest import assert_one_error_line, make_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def finished_set(model_run, tmp_path_factory):
    """A genuine five-image set; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("finished") / "set"
    assert _generate(model_run, out).exit_code == 0
    return out


def _generate(run, out, *flags):
    return runner.invoke(app, ["generate", str(run), "--num", "5", "--out", str(out), *flags])


def _report(run, data, out):
    return runner.invoke(app, ["report", str(run), "--data", str(data), "--out", str(out)])


def _plant(root: Path, names: list[str]) -> None:
    """Somebody else's files ('NAME/' is an empty folder)."""
    for name in names:
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"their {name}")


def _tree(root: Path) -> dict:
    """Every entry below root, hidden ones included, with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def _edit_manifest(root: Path, change) -> None:
    manifest = _manifest(root)
    change(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------
# Hidden names are something
# ---------------------------------------------------------------------------
HIDDEN_ONLY = [
    [".ssh/id_ed25519", ".aws/credentials", ".bashrc"],  # a home folder
    [".git/HEAD", ".progress/x", ".a.tmp", ".tmp-y/z"],  # names that merely look like our side files
    [".cache/"],  # an empty folder is something too
]


@pytest.mark.parametrize("names", HIDDEN_ONLY)
@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_generate_refuses_a_folder_of_hidden_files(model_run, tmp_path, names, flags):
    home = tmp_path / "home"
    _plant(home, names)
    before = _tree(home)
    assert_one_error_line(_generate(model_run, home, *flags), "holds other files", sorted(names)[0].rstrip("/"))
    assert _tree(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no staging folder, no lock left beside it


def test_a_resume_or_rerun_refuses_hidden_files_beside_our_own(model_run, finished_set, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(finished_set, out)
    _edit_manifest(out, lambda m: m.update(status="running"))  # an interrupted run ...
    _plant(out, [".git/HEAD"])  # ... that somebody put under version control
    before = _tree(out)
    assert_one_error_line(_generate(model_run, out), "holds other files", ".git/HEAD")
    assert_one_error_line(_generate(model_run, out), ".git/HEAD")
    assert _tree(out) == before
    # Without it, the leftovers of our own killed writer are ours: resumed, then cleaned.
    shutil.rmtree(out / ".git")
    _plant(out, [".tmp-0123456789ab-00000/000000001.png", "._manifest.json.0123abcd.tmp", ".progress/00000.json"])
    done = _generate(model_run, out)
    assert done.exit_code == 0 and "wrote 5" in done.output, done.output
    assert sorted(p.name for p in out.iterdir()) == ["00000", MANIFEST]
    verify(str(out))
    # A finished set with something added is not ours to call complete either.
    _plant(out, ["notes.txt"])
    assert_one_error_line(_generate(model_run, out), "notes.txt")
    assert (out / "notes.txt").read_text() == "their notes.txt"


def test_hostile_progress_markers_are_not_believed(model_run, finished_set, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(finished_set, out)
    _edit_manifest(out, lambda m: m.update(status="running"))
    (out / ".progress").mkdir()
    (out / ".progress" / "00000.json").write_text(json.dumps({"shard": "zero", "images": 5, "sha256": "x"}))
    done = _generate(model_run, out)
    assert done.exit_code == 0, done.output
    assert verify(str(out))["shards"] == _manifest(finished_set)["shards"]


# ---------------------------------------------------------------------------
# A manifest proves nothing on its own
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("manifest_name", [MANIFEST, "manifest.json"])
def test_a_planted_manifest_does_not_make_a_folder_ours(model_run, finished_set, tmp_path, manifest_name):
    home = tmp_path / "home"
    _plant(home, ["thesis.tex", "notes/chapter1.md", ".git/HEAD", ".ssh/id_ed25519"])
    shutil.copy(finished_set / MANIFEST, home / manifest_name)  # copied, or planted
    before = _tree(home)
    for flags in ([], ["--overwrite"], ["--seed", "9", "--overwrite"]):
        assert_one_error_line(_generate(model_run, home, *flags), "holds other files", ".git/HEAD")
    assert _tree(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_overwrite_refuses_a_genuine_set_once_anything_else_is_in_it(model_run, finished_set, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(finished_set, out)
    for planted in (
        ["notes.txt"],
        ["00000/thumbs.db"],
        ["00000/000000007.png"],  # named like ours, but no image of this set has that index
        [".DS_Store"],
        ["extra/"],
        ["manifest.json"],  # another tool's
    ):
        _plant(out, planted)
        before = _tree(out)
        assert_one_error_line(_generate(model_run, out, "--seed", "9", "--overwrite"), planted[0].rstrip("/"))
        assert _tree(out) == before
        path = out / planted[0]
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    replaced = _generate(model_run, out, "--seed", "9", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert verify(str(out))["seed"] == 9 and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_s3_overwrite_refuses_a_foreign_key_under_the_prefix(model_run, s3_bucket):
    import boto3

    uri = f"s3://{s3_bucket}/owned/set"
    generate(str(model_run), 5, uri, fmt="parquet")
    s3 = boto3.client("s3")
    for key in ("owned/set/notes.txt", "owned/set/.git/HEAD"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"theirs")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="owned/")["Contents"])
    manifest = s3.get_object(Bucket=s3_bucket, Key=f"owned/set/{MANIFEST}")["Body"].read()
    with pytest.raises(UserError, match=r"holds other files \(\.git/HEAD, notes\.txt\)"):
        generate(str(model_run), 5, uri, fmt="parquet", seed=9, overwrite=True)
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="owned/")["Contents"]) == keys
    assert s3.get_object(Bucket=s3_bucket, Key=f"owned/set/{MANIFEST}")["Body"].read() == manifest


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "names",
    [
        [".ssh/id_ed25519", ".aws/credentials", ".bashrc"],
        ["report.json", "index.html", "thesis.tex"],  # a marker beside somebody's file
        ["report.json", ".git/HEAD"],
        ["report.json", "notes/"],
    ],
)
def test_report_refuses_a_folder_that_is_not_only_a_report(model_run, tiny_data, tmp_path, names):
    home = tmp_path / "home"
    _plant(home, names)
    before = _tree(home)
    foreign = [n for n in names if n not in ("report.json", "index.html")]
    assert_one_error_line(_report(model_run, tiny_data, home), "not a vae-ray report", sorted(foreign)[0].rstrip("/"))
    assert _tree(home) == before


# ---------------------------------------------------------------------------
# Class folders are distinct, and checked when read back
# ---------------------------------------------------------------------------
def test_class_folders_are_distinct_by_construction():
    for classes in (["x", "x-2", "x"], ["x", "X"], ["x", "x-2", "X"], ["a"] * 30, ["", "", "class-0", "class-1"]):
        folders = class_folders(classes)
        assert len({f.lower() for f in folders}) == len(classes), (classes, folders)
        assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", f) for f in folders), folders
    assert class_folders(["x", "x-2", "x"])[:2] == ["x", "x-2"]  # the first of each name keeps it
    assert class_folders(["y" * 70, "y" * 70]) == ["y" * 64, "y" * 58 + "-1"]  # names as before when distinct


def test_colliding_class_names_get_a_folder_each(tmp_path):
    classes = ["x", "x-2", "x", "X", "_manifest.json"]  # the last one's folder is named like an old manifest
    run = make_checkpoint(tmp_path / "run", conditional=True, classes=classes)
    area = tmp_path / "area"
    out = area / "set"
    done = runner.invoke(app, ["generate", str(run), "--num", "15", "--per-class", "--out", str(out)])
    assert done.exit_code == 0, done.output
    counts = {d.name: len(list(d.rglob("*.png"))) for d in out.iterdir() if d.is_dir()}
    assert len(counts) == 5 and set(counts.values()) == {3}, counts
    assert len({name.lower() for name in counts}) == 5
    verify(str(out))
    again = runner.invoke(
        app, ["generate", str(run), "--num", "15", "--per-class", "--seed", "9", "--overwrite", "--out", str(out)]
    )
    assert again.exit_code == 0, again.output
    assert verify(str(out))["seed"] == 9 and sorted(p.name for p in area.iterdir()) == ["set"]


def test_verify_fails_when_class_folders_are_not_distinct_or_leave_the_set(tmp_path):
    run = make_checkpoint(tmp_path / "run", conditional=True, classes=["x", "x-2", "x"])
    out = tmp_path / "set"
    assert runner.invoke(app, ["generate", str(run), "--num", "6", "--per-class", "--out", str(out)]).exit_code == 0
    # What an earlier vae-ray wrote for these names: the third class in the second one's folder.
    (third,) = [d for d in out.iterdir() if d.is_dir() and d.name not in ("x", "x-2")]
    for png in (third / "00000").iterdir():
        png.rename(out / "x-2" / "00000" / png.name)
    shutil.rmtree(third)
    _edit_manifest(out, lambda m: m.update(class_folders={"x": "x-2", "x-2": "x-2"}))
    assert_one_error_line(runner.invoke(app, ["generate", "--verify", str(out)]), "class folders", "not distinct")
    # Case-only differences collide on macOS and Windows.
    run2 = make_checkpoint(tmp_path / "run2", conditional=True, classes=["p", "q"])
    out2 = tmp_path / "set2"
    assert runner.invoke(app, ["generate", str(run2), "--num", "4", "--per-class", "--out", str(out2)]).exit_code == 0
    verify(str(out2))
    _edit_manifest(out2, lambda m: m.update(class_folders={"p": "p", "q": "P"}))
    assert_one_error_line(runner.invoke(app, ["generate", "--verify", str(out2)]), "not distinct")
    _edit_manifest(out2, lambda m: m.update(class_folders={"p": "../../p", "q": "q"}))
    assert_one_error_line(runner.invoke(app, ["generate", "--verify", str(out2)]), "class folder")


# ---------------------------------------------------------------------------
# Nothing read back is believed before it is checked
# ---------------------------------------------------------------------------
HOSTILE_MANIFESTS = {
    "a billion one-image shards": lambda m: (
        m["plan"].update(num=10**9, shard_size=1) or m.update(count=10**9, shards=[])
    ),
    "a shard named in words": lambda m: m["shards"][0].update(shard="zero"),
    "shards as text": lambda m: m.update(shards="abc"),
    "a shard entry that is a list": lambda m: m.update(shards=[[0, 5, "x"]]),
    "a count as text": lambda m: m["plan"].update(num="5"),
    "classes as a number": lambda m: m["dataset"].update(classes=5),
    "a plan as a list": lambda m: m.update(plan=[1, 2]),
    "class confidences as a list": lambda m: m["plan"].update(min_confidence=0.5, class_confidences=[0.5]),
    "class confidences beyond 1": lambda m: m["plan"].update(min_confidence=0.5, class_confidences="0.5,7"),
    "class confidences without a threshold": lambda m: m["plan"].update(class_confidences="0.5"),
    "class confidences for other classes": lambda m: m["plan"].update(min_confidence=0.5, class_confidences="0.5,0.6"),
    "a least class confidence that is not the threshold": lambda m: m["plan"].update(
        min_confidence=0.4, class_confidences=",".join(["0.5"] * 10)
    ),
    "a filter summary as text": lambda m: m.update(filter="all of them"),
    "a filter summary of other thresholds": lambda m: m.update(filter={"class_confidences": "0.5"}),
    "a filter summary counting in words": lambda m: m.update(filter={"acceptance_rate": "most"}),
}


@pytest.mark.parametrize("change", list(HOSTILE_MANIFESTS.values()), ids=list(HOSTILE_MANIFESTS))
def test_verify_checks_a_manifest_before_believing_it(model_run, finished_set, tmp_path, change):
    out = tmp_path / "set"
    shutil.copytree(finished_set, out)
    _edit_manifest(out, change)
    assert_one_error_line(runner.invoke(app, ["generate", "--verify", str(out)]), str(out), MANIFEST)
    assert_one_error_line(_generate(model_run, out, "--overwrite"), str(out), MANIFEST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_manifests_and_shard_counts_are_bounded(finished_set, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="more than 100,000 shards"):
        check_options(num=200_000, shard_size=1)
    out = tmp_path / "set"
    shutil.copytree(finished_set, out)
    monkeypatch.setattr(destination, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(UserError, match="larger than"):
        verify(str(out))


# ---------------------------------------------------------------------------
# A swap cut short is settled by the next command
# ---------------------------------------------------------------------------
def test_a_crash_between_the_renames_of_an_overwrite_is_settled(model_run, finished_set, tmp_path, monkeypatch):
    area = tmp_path / "area"
    area.mkdir()
    out = area / "set"
    shutil.copytree(finished_set, out)

    def power_cut(self, staging):
        raise RuntimeError("power cut")

    with monkeypatch.context() as patch:  # the new set is complete, the swap never starts ...
        patch.setattr(generation.Generation, "_swap_in", power_cut)
        with pytest.raises(RuntimeError, match="power cut"):
            generate(str(model_run), 5, str(out), seed=9, overwrite=True)
    out.rename(area / ".set.old")  # ... or, as here, stops after its first rename
    again = _generate(model_run, out, "--seed", "9", "--overwrite")
    assert again.exit_code == 0, again.output
    assert verify(str(out))["seed"] == 9
    assert sorted(p.name for p in area.iterdir()) == ["set"]  # neither the old set nor the staging folder is left


def test_a_swap_cut_short_is_rolled_back_or_finished_by_any_next_command(model_run, finished_set, tmp_path):
    area = tmp_path / "area"
    area.mkdir()
    out = area / "set"
    shutil.copytree(finished_set, area / ".set.old")  # OUT renamed aside, its successor never moved in
    inode = (area / ".set.old" / "00000" / "000000000.png").stat().st_ino
    again = _generate(model_run, out)
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output  # rolled back, not redone
    assert (out / "00000" / "000000000.png").stat().st_ino == inode
    assert sorted(p.name for p in area.iterdir()) == ["set"]
    # Cut short after the second rename: the old set's removal is finished.
    shutil.copytree(finished_set, area / ".set.old")
    assert _generate(model_run, out).exit_code == 0
    assert sorted(p.name for p in area.iterdir()) == ["set"]
    # A folder of that name that is not ours is never touched, and no swap goes through it.
    _plant(area / ".set.old", ["thesis.tex"])
    assert_one_error_line(_generate(model_run, out, "--seed", "9", "--overwrite"), ".set.old", "thesis.tex")
    assert (area / ".set.old" / "thesis.tex").read_text() == "their thesis.tex"
    assert verify(str(out))["seed"] == 0


def test_a_report_swap_cut_short_is_settled(model_run, tiny_data, tmp_path, monkeypatch):
    from vae_ray import report

    monkeypatch.setattr(report, "MAP_POINTS", 100)  # a small t-SNE: the maps are not what is tested
    area = tmp_path / "area"
    area.mkdir()
    out = area / "report"
    earlier = ["report.json", "index.html", "samples.png", "latent_tsne.png"]
    for name in (
        ".report.old",
        ".report.new",
    ):  # the old report renamed aside, its successor staged: then the power went
        _plant(area / name, earlier)
        (area / name / "report.json").write_text(json.dumps({"run": "r", "checkpoint": "r/checkpoint_epoch_0001"}))
    again = _report(model_run, tiny_data, out)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "report.json").read_text())["checkpoint"]  # the new report, not a planted copy
    assert (out / "index.html").is_file() and (out / "arithmetic.png").is_file()
    assert sorted(p.name for p in area.iterdir()) == ["report"]
    # A folder under either name that holds anything else is never touched, and no report goes through it.
    _plant(area / ".report.new", ["thesis.tex"])
    assert_one_error_line(_report(model_run, tiny_data, out), ".report.new", "thesis.tex")
    assert (area / ".report.new" / "thesis.tex").read_text() == "their thesis.tex"


def test_a_folder_holding_only_names_a_report_uses_is_not_a_report(model_run, tiny_data, tmp_path):
    """A web site's index.html is not a report's: only its marker, naming
    the checkpoint it was made from, makes a folder one vae-ray may replace."""
    site = tmp_path / "site"
    _plant(site, ["index.html", "samples.png"])
    assert_one_error_line(_report(model_run, tiny_data, site), "holds other files", "not a vae-ray report")
    assert (site / "index.html").read_text() == "their index.html"
    (site / "report.json").write_text('{"run": "somebody"}')  # a marker naming no checkpoint proves nothing either
    assert_one_error_line(_report(model_run, tiny_data, site), "not a vae-ray report")
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "report.json", "samples.png"]


@pytest.mark.parametrize(("fmt", "copies"), [("parquet", 1), ("png", 3)])
def test_an_s3_overwrite_writes_its_manifest_last(model_run, s3_bucket, monkeypatch, fmt, copies):
    """A crash in the middle of an S3 --overwrite never leaves a complete
    manifest over old data; the same command run again finishes the swap."""
    uri = f"s3://{s3_bucket}/crash-{fmt}/set"
    generate(str(model_run), 5, uri, fmt=fmt)
    real = storage.filesystem
    left = {"copies": copies}

    class PowerCut:
        def __init__(self, fs):
            self.fs = fs

        def copy_file(self, src, dst):
            self.fs.copy_file(src, dst)
            left["copies"] -= 1
            if left["copies"] == 0:
                raise RuntimeError("power cut")

        def __getattr__(self, name):
            return getattr(self.fs, name)

    def crashing(target):
        fs, path = real(target)
        return (PowerCut(fs) if storage.is_remote(target) else fs), path

    with monkeypatch.context() as patch:
        patch.setattr(storage, "filesystem", crashing)
        with pytest.raises(RuntimeError, match="power cut"):
            generate(str(model_run), 5, uri, fmt=fmt, seed=9, overwrite=True)
    assert read_manifest(uri) is None  # no manifest vouches for the half-copied set
    with pytest.raises(UserError, match="not a generated set"):
        verify(uri)
    again = generate(str(model_run), 5, uri, fmt=fmt, seed=9, overwrite=True)
    assert not again.get("already_complete")
    assert verify(uri)["seed"] == 9
    assert storage.leaves(f"s3://{s3_bucket}/crash-{fmt}") == [
        f"set/{name}" for name in storage.leaves(uri)
    ]  # no staging prefix left beside it


# ---------------------------------------------------------------------------
# Free space, before the first write
# ---------------------------------------------------------------------------
def test_a_set_that_cannot_fit_is_refused_before_anything_is_written(model_run, tmp_path, monkeypatch):
    real = shutil.disk_usage
    seen = []

    def small_disk(path):
        seen.append(str(path))
        return real(path)._replace(free=1_000_000)  # 1 MB: 5 PNGs fit, 1,000 do not

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    out = tmp_path / "new" / "set"
    refused = runner.invoke(app, ["generate", str(model_run), "--num", "1000", "--out", str(out)])
    assert_one_error_line(refused, str(out), "free")
    assert not (tmp_path / "new").exists()
    assert seen and all(Path(p) == tmp_path for p in seen)  # the nearest folder that exists
    assert _generate(model_run, out).exit_code == 0  # a set that fits is written
    verify(str(out))
