"""The path cluster users take, on a real multi-node Ray cluster on loopback
(the `cluster` fixture: a head and two worker nodes started with `ray start`,
token authentication on, vae-ray installed from its wheel): data and runs on
a real S3 server, DDP across nodes, jobs submitted from the installed
package, elastic training through a lost node, and no silent hangs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vae_ray import storage
from vae_ray.rundir import RunDir

from conftest import TOKEN, assert_process_error_line

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def s3_data(cluster, tiny_data, s3_bucket) -> str:
    uri = f"s3://{s3_bucket}/data/digits"
    storage.upload(tiny_data, uri)
    return uri


def _json(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def test_a_run_on_s3_trained_across_two_nodes_is_read_by_every_command(cluster, s3_data, s3_bucket):
    run = f"s3://{s3_bucket}/runs/two-nodes"
    common = ["--latent-dim", "4", "--address", cluster.gcs]
    # Two ranks with two antithetic latent samples per image, and a global
    # batch of 65 that two workers share as 33 + 32.
    summary = _json(
        cluster.run(
            "train",
            "--data",
            s3_data,
            "--out",
            run,
            "--epochs",
            "2",
            "--workers",
            "2",
            "--cpus-per-worker",
            "1",
            "--batch-size",
            "65",
            "--z-samples",
            "2",
            "--json",
            *common,
        )
    )
    history = RunDir(run).history()
    assert [h["epoch"] for h in history] == [1, 2] and summary["epochs"] == 2
    assert all(h["workers"] == 2 and h["nodes"] == 2 for h in history)  # two ranks, two nodes, one gloo group
    assert history[0]["test_images"] == 512  # the ranks' parts of the test split cover it once
    assert history[0]["global_step"] == 7  # 256 images per rank // 33 per step: the same steps on both
    assert storage.read_pointer(run, "latest") == "checkpoint_epoch_0002"
    assert {"model.safetensors", "optimizer.pt", "state.json", "config.json"} <= set(
        storage.list_dir(f"{run}/checkpoint_epoch_0002")
    )
    assert "samples.png" in storage.list_dir(f"{run}/plots") and storage.walk_files(f"{run}/tensorboard")
    assert not any(p.name.startswith("s3") for p in cluster.temp_dir.iterdir())  # no local stand-in for the URI

    gen = f"s3://{s3_bucket}/gen/two-nodes"
    done = cluster.run(
        "generate",
        run,
        "--num",
        "30",
        "--shard-size",
        "10",
        "--format",
        "parquet",
        "--out",
        gen,
        "--address",
        cluster.gcs,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "actor pool" in done.stderr
    verified = cluster.run("generate", "--verify", gen)
    assert verified.returncode == 0 and "30 parquet images in 3 shards" in verified.stderr

    scores = _json(
        cluster.run(
            "evaluate", run, "--json", "--samples", "0", "--iw-samples", "2", "--limit", "64", "--address", cluster.gcs
        )
    )
    assert scores["images"] == 64 and scores["nll_iw_nats"] <= scores["neg_elbo_nats"]
    assert storage.read_json(f"{run}/evaluation.json")["images"] == 64

    page = cluster.run("report", run)
    assert page.returncode == 0, page.stderr[-2000:]
    assert "latent_tsne.png" in storage.list_dir(f"{run}/report") and "index.html" in storage.list_dir(f"{run}/report")


WAIT_FOR_CPUS = """
import sys, time, ray
ray.init(address=sys.argv[1])
started, want, limit = time.monotonic(), float(sys.argv[2]), float(sys.argv[3])
while ray.available_resources().get("CPU", 0) < want:
    if time.monotonic() - started > limit:
        sys.exit(f"free: {ray.available_resources()}")
    time.sleep(0.5)
print(f"waited {time.monotonic() - started:.1f} s for {want:g} free CPUs")
"""


def test_elastic_training_survives_losing_a_node(cluster, s3_data, s3_bucket):
    """Takes one of the cluster's three nodes away, and adds a fresh one back
    for the tests after it. Runs before the jobs test: started within minutes
    after it, the run waited 78-153 s before its first epoch (18-28 s
    otherwise; README, elastic training)."""
    run = f"s3://{s3_bucket}/runs/elastic"
    # Elastic runs start with what is free; wait until the earlier tests' workers are gone.
    waited = subprocess.run(
        [str(cluster.venv / "bin" / "python"), "-c", WAIT_FOR_CPUS, cluster.gcs, "3", "120"],
        env=cluster.env,
        capture_output=True,
        text=True,
    )
    assert waited.returncode == 0, f"the cluster's CPUs never came free: {waited.stdout}{waited.stderr[-2000:]}"
    print(waited.stdout.strip())
    proc = subprocess.Popen(
        [
            cluster.exe(),
            "train",
            "--data",
            s3_data,
            "--out",
            run,
            "--epochs",
            "4",
            "--workers",
            "3",
            "--min-workers",
            "2",
            "--cpus-per-worker",
            "1",
            "--batch-size",
            "64",
            "--latent-dim",
            "4",
            "--address",
            cluster.gcs,
            "--json",
        ],
        # After the loss, Ray Train first retries with the old size until its worker-group
        # start timeout (60 s by default) passes, then continues with what is left.
        env={**cluster.env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"},
        cwd=cluster.temp_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while RunDir(run).last_epoch() < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        print(f"epoch 2 done {time.time() - deadline + 300:.1f} s after the start")
        victim = _a_worker_node_running_training(cluster)
        victim.kill()  # a spot instance taken away, with its workers: no warning
        cluster.nodes.remove(victim)
        killed = time.time()
        out, err = proc.communicate(timeout=400)
        print(f"the run ended {time.time() - killed:.1f} s after the node was lost")
    finally:
        if proc.poll() is None:
            proc.kill()
        if len(cluster.nodes) < 3:
            cluster.add_node()  # a replacement, as an autoscaler would start one
    assert proc.returncode == 0, err[-3000:]
    history = RunDir(run).history()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # every epoch exactly once
    shape = [(h["epoch"], h["workers"], h["nodes"], h["started_at_epoch"]) for h in history]
    # It started with what was free (2 or 3 workers), and continued from the epoch-2
    # checkpoint with what the cluster had left.
    assert all(2 <= h["workers"] <= 3 for h in history) and max(h["started_at_epoch"] for h in history) >= 3, shape


def test_jobs_from_an_installed_package(cluster, s3_data, s3_bucket):
    """Submitted from the wheel's environment (no jobs/ folder, no checkout):
    wait and stream by default, --no-wait to detach, list/status/logs/stop."""
    run = f"s3://{s3_bucket}/runs/job"
    done = cluster.run(
        "train",
        "--data",
        s3_data,
        "--out",
        run,
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--latent-dim",
        "2",
        "--submit",
        "--address",
        cluster.dashboard,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert TOKEN not in done.stdout + done.stderr and "succeeded" in done.stderr
    assert json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])["epochs"] == 1
    assert [h["epoch"] for h in RunDir(run).history()] == [1]
    gen = f"s3://{s3_bucket}/gen/job"
    made = cluster.run("generate", run, "--num", "20", "--out", gen, "--submit", "--address", cluster.dashboard)
    assert made.returncode == 0, made.stderr[-3000:]
    assert storage.read_json(f"{gen}/_manifest.json")["count"] == 20
    scored = cluster.run(
        "evaluate",
        run,
        "--samples",
        "0",
        "--iw-samples",
        "2",
        "--limit",
        "64",
        "--submit",
        "--address",
        cluster.dashboard,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert storage.read_json(f"{run}/evaluation.json")["images"] == 64  # written by the job's driver, on S3
    # A search on S3, detached, then followed to its end.
    found = f"s3://{s3_bucket}/search/job"
    detached = cluster.run(
        "tune",
        "--data",
        s3_data,
        "--out",
        found,
        "--latent-dims",
        "2",  # one trial: the job's driver, Tune and S3 are what this checks
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--submit",
        "--no-wait",
        "--address",
        cluster.dashboard,
    )
    tune_id = detached.stdout.strip().splitlines()[-1]
    assert detached.returncode == 0 and tune_id.startswith("vae-ray-tune-"), detached.stderr[-2000:]
    followed = cluster.run("jobs", "logs", tune_id, "--follow", "--address", cluster.dashboard)
    assert followed.returncode == 0 and '"best"' in followed.stdout, followed.stderr[-2000:]
    assert storage.read_pointer(found, "best").startswith("trials/")
    assert "trial_id" in storage.read_bytes(f"{found}/results.csv").decode()

    listed = cluster.run("jobs", "list", "--address", cluster.dashboard)
    rows = [line.split("\t") for line in listed.stdout.splitlines()]  # not a terminal: plain rows, whole ids
    assert rows and all(len(r) == 4 for r in rows), listed.stdout
    assert {r[0].split("-")[2] for r in rows} >= {"train", "tune", "generate"}
    assert all(r[1] == "SUCCEEDED" for r in rows)
    train_id = next(r[0] for r in rows if r[2] == "train")
    assert cluster.run("jobs", "status", train_id, "--address", cluster.dashboard).stdout.strip() == "SUCCEEDED"
    assert '"epochs": 1' in cluster.run("jobs", "logs", train_id, "--address", cluster.dashboard).stdout

    # The finished run, continued by a job for many more epochs, detached, then stopped.
    long = cluster.run(
        "train",
        "--out",
        run,
        "--resume",
        "--epochs",
        "500",
        "--submit",
        "--no-wait",
        "--address",
        cluster.dashboard,
    )
    job_id = long.stdout.strip().splitlines()[-1]
    assert long.returncode == 0 and job_id.startswith("vae-ray-train-")
    deadline = time.time() + 120
    while RunDir(run).read_config()[0]["epochs"] != 500:  # the job's driver resumed the run on S3
        assert time.time() < deadline
        time.sleep(0.5)
    assert cluster.run("jobs", "status", job_id, "--address", cluster.dashboard).stdout.strip() == "RUNNING"
    stopped = cluster.run("jobs", "stop", job_id, "--address", cluster.dashboard)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "STOPPED"
    assert [h["epoch"] for h in RunDir(run).history()][:1] == [1]

    failed = cluster.run(
        "train",
        "--data",
        f"s3://{s3_bucket}/no-such-data",
        "--out",
        f"s3://{s3_bucket}/runs/x",
        "--submit",
        "--address",
        cluster.dashboard,
    )
    assert failed.returncode == 1 and "no-such-data" in failed.stderr and "not a prepared dataset" in failed.stderr


def test_addresses_and_tokens_as_ray_users_write_them(cluster, s3_data, tmp_path):
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    attempts = {  # independent commands, run side by side, each with its own output folder
        "missing": (["jobs", "list", "--address", cluster.dashboard], {}),
        "wrong": (["jobs", "list", "--address", cluster.dashboard], {"RAY_AUTH_TOKEN": "not-the-token"}),
        "joined": (
            ["train", "--data", s3_data, "--out", str(tmp_path / "joined"), "--address", cluster.gcs],
            {"RAY_gcs_rpc_server_connect_timeout_s": "3"},
        ),
        "dashboard": (
            ["train", "--data", s3_data, "--out", str(tmp_path / "dashboard")],
            {"RAY_ADDRESS": cluster.dashboard, "RAY_AUTH_TOKEN": TOKEN},
        ),
        "dead": (["jobs", "list", "--address", "http://127.0.0.1:9"], {}),
        "unknown": (
            ["jobs", "status", "vae-ray-train-nonexistent", "--address", cluster.dashboard],
            {"RAY_AUTH_TOKEN": TOKEN},
        ),
    }
    procs = {
        name: subprocess.Popen(
            [cluster.exe(), *args], env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (args, extra) in attempts.items()
    }
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():  # none outlives a failed wait
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert_process_error_line(done["missing"], "requires a token", "RAY_AUTH_TOKEN")
    assert_process_error_line(done["wrong"], "rejected the token")
    assert "not-the-token" not in done["wrong"].stderr
    assert_process_error_line(done["joined"], "requires a token")
    assert_process_error_line(done["dashboard"], "is a dashboard (Jobs API) address", "--submit")
    assert_process_error_line(done["dead"], "cannot reach a Ray cluster")
    assert_process_error_line(done["unknown"], "vae-ray-train-nonexistent")


def test_a_job_whose_python_lacks_the_requirements_says_so(wheel_env, tmp_path):
    """What a job prints when the head's `python` is not the environment with torch."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    package = next(wheel_env.glob("lib/python*/site-packages"))
    spec = json.dumps({"command": "generate", "kwargs": {"options": {"checkpoint": "x", "num": 1, "out": "y"}}})
    (tmp_path / "only").mkdir()
    os.symlink(package / "vae_ray", tmp_path / "only" / "vae_ray")  # the package alone, as py_modules ships it
    done = subprocess.run(
        [str(bare / "bin" / "python"), "-m", "vae_ray.jobs", spec],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": f"{tmp_path / 'only'}"},
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert str(bare / "bin" / "python") in done.stderr and "cannot import" in done.stderr
    assert "--install-requirements" in done.stderr and "Traceback" not in done.stderr


HOLD = textwrap.dedent("""
    import sys, time, ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    ray.init(address=sys.argv[1])
    free = lambda: int(ray.available_resources().get("CPU", 0))
    # The jobs stopped by earlier tests free their workers' resources a little
    # after they end: wait for an idle cluster (a group Ray itself leaked
    # after a node loss never frees: then as long as a stopped job may take).
    deadline = time.time() + 90
    while free() < ray.cluster_resources().get("CPU", 0) and time.time() < deadline:
        time.sleep(1)
    busy = [g for g in placement_group_table().values() if g.get("state") == "CREATED"]
    if busy:  # held by what an earlier test left behind: said, and held around
        print("groups still placed:", busy, file=sys.stderr, flush=True)
    # Then take every free CPU, and keep taking any CPU freed later, so the
    # run under test never finds one.
    groups, said = [], False
    while True:
        cpus = free()
        if cpus:
            pg = placement_group([{"CPU": 1}] * cpus, strategy="SPREAD")
            try:
                ray.get(pg.ready(), timeout=30)
                groups.append(pg)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)  # raced with another request: asked again
                continue
        if not said:
            print("held", flush=True)
            said = True
        time.sleep(0.5)
""")


def test_a_run_that_cannot_start_says_what_it_waits_for_and_resumes(cluster, s3_data, s3_bucket, tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    holder = subprocess.Popen(
        [str(cluster.venv / "bin" / "python"), str(script), cluster.gcs],
        env=cluster.env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        run = f"s3://{s3_bucket}/runs/stalled"
        started = time.monotonic()
        done = cluster.run(
            "train",
            "--data",
            s3_data,
            "--out",
            run,
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--cpus-per-worker",
            "1",
            "--stall-timeout",
            "10",
            "--address",
            cluster.gcs,
        )
        assert_process_error_line(done, "no progress for 10 s", "waiting for resources", "--resume", code=1)
        assert time.monotonic() - started < 120
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    resumed = _json(
        cluster.run("train", "--out", run, "--resume", "--stall-timeout", "300", "--json", "--address", cluster.gcs)
    )
    assert resumed["epochs"] == 1


def _a_worker_node_running_training(cluster):
    """A (non-head) node of the cluster that hosts one of the run's Train workers."""
    pids = subprocess.run(["pgrep", "-f", "^ray::RayTrainWorker"], capture_output=True, text=True).stdout.split()
    sessions = {os.getsid(int(pid)) for pid in pids if os.path.exists(f"/proc/{pid}")}
    return next(node for node in cluster.nodes[1:] if node.process.pid in sessions)
