"""The GPU suite's dry run: every step of benchmarks/gpu_suite.sh on the CPU
at a tiny size, so the suite itself works before a GPU ever runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_cifar_batches, write_fake_idx_dataset

pytestmark = [pytest.mark.subprocess, pytest.mark.ray]


def test_the_gpu_suite_runs_in_dry_run_mode(ray_cluster, tmp_path):
    import ray

    data = tmp_path / "data"
    write_fake_idx_dataset(data / "mnist", n_train=600, n_test=100)
    write_cifar_batches(data / "cifar-10-batches-py", per_batch=20)
    out = tmp_path / "report"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "VAE_RAY_GPU_SUITE_DATA": str(data),
        "VAE_RAY_GPU_SUITE_OUT": str(out),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # Its commands join the session's cluster: the steps are what is checked, not Ray's start-up.
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }
    suite = str(REPO / "benchmarks" / "gpu_suite.sh")
    done = subprocess.run([suite, "--dry-run"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stderr + (out / "gpu_suite.log").read_text())[-3000:]
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["dry_run"] and report["device"].startswith("CPU") and "skipped" not in report
    assert report["mnist_30_epochs_seconds"] > 0 and report["mnist_batch32_30_epochs_seconds"] > 0
    for fmt in ("parquet", "png"):
        assert 0 < report[f"generate_{fmt}_command_images_per_s"] <= report[f"generate_{fmt}_job_images_per_s"]
    assert report["step_ms_eager"] > 0 and report["step_ms_bf16"] > 0  # the worker's own step, timed
    assert (out / "work" / "profile" / "trace_eager.json").stat().st_size > 1000
    # Two trials of the search ran side by side (the dry run's cluster has CPUs for four).
    assert report["tune_max_trials_at_once"] == 2 and report["tune_over_one_trial"] > 0
    assert "dry run" in (out / "gpu_report.md").read_text()

    # The CIFAR-10 quality run is its own call.
    env["VAE_RAY_GPU_SUITE_OUT"] = str(tmp_path / "cifar")
    done = subprocess.run([suite, "--dry-run", "--cifar"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stderr + (tmp_path / "cifar" / "gpu_suite.log").read_text())[-3000:]
    report = json.loads((tmp_path / "cifar" / "gpu_report.json").read_text())
    assert report["cifar_bits_per_dim"] > 0 and "mnist_30_epochs_seconds" not in report
    assert report["cifar_epochs"] == 1 and "logistic_mixture" in report["cifar_network"]
    assert report["cifar_scored_images"] == 20 and report["cifar_scored_on"].endswith(
        "CPU actor(s)"
    )  # the whole test batch

    # So is the MNIST likelihood run.
    env["VAE_RAY_GPU_SUITE_OUT"] = str(tmp_path / "nll")
    done = subprocess.run([suite, "--dry-run", "--nll"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stderr + (tmp_path / "nll" / "gpu_suite.log").read_text())[-3000:]
    report = json.loads((tmp_path / "nll" / "gpu_report.json").read_text())
    assert report["mnist_hvae_nll_iw_nats"] <= report["mnist_hvae_neg_elbo_nats"]
    assert report["mnist_hvae_iw_samples"] == 8 and "failed" not in report
