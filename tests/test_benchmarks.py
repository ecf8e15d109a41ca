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
    done = subprocess.run(
        [str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stderr + (out / "gpu_suite.log").read_text())[-3000:]
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["dry_run"] and report["device"].startswith("CPU")
    assert report["mnist_30_epochs_seconds"] > 0 and report["generate_images_per_s"] > 0
    assert 0 < report["generate_command_images_per_s"] <= report["generate_images_per_s"]
    assert report["cifar_bits_per_dim"] > 0
    assert "dry run" in (out / "gpu_report.md").read_text()
