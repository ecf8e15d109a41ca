"""What a search's trials ask for and how many run at once, on described
clusters (the Tune run on a cluster that declares a rehearsal GPU resource is
in test_tune.py)."""

import pytest
from typer.testing import CliRunner

from vae_ray import trials
from vae_ray.cli import app
from vae_ray.errors import UserError

from conftest import assert_one_error_line

GPU_BOX = {"CPU": 64, "GPU": 8}


def test_one_worker_trials_share_each_gpu_four_ways_by_default():
    plan = trials.plan([GPU_BOX], workers=1, gpus_per_trial=None, gpu=None)
    assert plan.gpus_per_worker == 0.25 and plan.concurrency == 32
    assert plan.cpus_per_worker == 1  # 63 CPUs (one kept for Ray Data) over 32 workers
    assert plan.worker_resources() == {"CPU": 1, "GPU": 0.25} and plan.on_device


def test_a_given_fraction_sets_trials_per_gpu_and_splits_the_cpus():
    plan = trials.plan([GPU_BOX], workers=1, gpus_per_trial=0.5, gpu=None)
    assert (plan.gpus_per_worker, plan.concurrency, plan.cpus_per_worker) == (0.5, 16, 3)
    plan = trials.plan([GPU_BOX], workers=1, gpus_per_trial=0.3, gpu=None)
    assert plan.concurrency == 24  # three 0.3 shares fit a GPU, not 3.33
    plan = trials.plan([GPU_BOX], workers=1, gpus_per_trial=1, gpu=None)
    assert (plan.gpus_per_worker, plan.concurrency, plan.cpus_per_worker) == (1.0, 8, 7)


def test_multi_worker_trials_take_a_whole_gpu_per_worker():
    plan = trials.plan([GPU_BOX], workers=2, gpus_per_trial=None, gpu=None)
    assert (plan.gpus_per_worker, plan.concurrency, plan.cpus_per_worker) == (1.0, 4, 7)
    with pytest.raises(UserError, match="NCCL"):
        trials.plan([GPU_BOX], workers=2, gpus_per_trial=1, gpu=None)
    with pytest.raises(UserError, match="more than one GPU"):
        trials.plan([GPU_BOX], workers=1, gpus_per_trial=2, gpu=None)


def test_auto_trains_on_cpus_when_a_trial_would_not_fit_the_gpus_and_cpus_must_fit_a_gpu_node():
    assert trials.plan([{"CPU": 16, "GPU": 1}], workers=2, gpus_per_trial=None, gpu=None).gpus_per_worker == 0
    nodes = [{"CPU": 64}, {"CPU": 4, "GPU": 1}]  # the CPUs are on a node without the GPU
    with pytest.raises(UserError, match="no node with GPUs has that many CPUs"):
        trials.plan(nodes, workers=1, gpus_per_trial=None, gpu=None, cpus_per_worker=8)
    # Concurrency counts what the GPU node can hold beside its GPUs: 2 CPUs each, 4 CPUs there.
    assert trials.plan(nodes, workers=1, gpus_per_trial=None, gpu=None, cpus_per_worker=2).concurrency == 2
    with pytest.raises(UserError, match="no node has that many CPUs"):
        trials.plan([{"CPU": 4}, {"CPU": 4}], workers=1, gpus_per_trial=0, gpu=None, cpus_per_worker=6)


def test_gpus_spread_over_nodes_and_the_tightest_node_sets_the_cpus():
    nodes = [{"CPU": 16, "GPU": 1}, {"CPU": 8, "GPU": 2}, {"CPU": 32}]
    plan = trials.plan(nodes, workers=1, gpus_per_trial=None, gpu=None)
    assert plan.concurrency == 12  # 3 GPUs x 4
    assert plan.cpus_per_worker == 1  # the 8-CPU node holds 8 workers: 7 // 8, at least one
    capped = trials.plan(nodes, workers=1, gpus_per_trial=None, gpu=None, max_concurrent=2)
    assert capped.concurrency == 2 and capped.cpus_per_worker == 3  # 7 CPUs over the 2 workers a node gets


def test_cpu_clusters_keep_the_cpu_split():
    plan = trials.plan([{"CPU": 16}, {"CPU": 16}], workers=2, gpus_per_trial=None, gpu=None)
    assert (plan.gpus_per_worker, plan.cpus_per_worker, plan.concurrency) == (0.0, 1, 16)
    assert plan.worker_resources() == {"CPU": 1} and not plan.on_device
    local = trials.plan([{"CPU": 3}], workers=1, gpus_per_trial=None, gpu=None, local_cpus=2)
    assert (local.cpus_per_worker, local.concurrency) == (1, 2)  # the machine's cores, not Ray's extra CPU
    assert trials.plan([GPU_BOX], workers=1, gpus_per_trial=0, gpu=None).gpus_per_worker == 0
    assert trials.plan([GPU_BOX], workers=1, gpus_per_trial=None, gpu=False).gpus_per_worker == 0


@pytest.mark.parametrize(
    "nodes, kwargs, words",
    [
        ([{"CPU": 8}], {"gpus_per_trial": 0.5}, "the cluster has 0"),
        ([{"CPU": 8}], {"gpus_per_trial": None, "gpu": True}, "the cluster has 0"),
        ([GPU_BOX], {"gpus_per_trial": 0.5, "gpu": False}, "contradict"),
        ([GPU_BOX], {"gpus_per_trial": 0, "gpu": True}, "contradict"),
        ([GPU_BOX], {"gpus_per_trial": -1}, "must be a number >= 0"),
        ([GPU_BOX], {"gpus_per_trial": float("nan")}, "must be a number >= 0"),
        ([GPU_BOX], {"gpus_per_trial": float("inf")}, "must be a number >= 0"),
        ([GPU_BOX], {"gpus_per_trial": 0.00001}, "smallest share"),
        ([{"CPU": 4}], {"gpus_per_trial": None, "max_concurrent": 10}, "lower --max-concurrent"),
    ],
)
def test_impossible_plans_say_why(nodes, kwargs, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        trials.plan(nodes, workers=1, **{"gpu": None, **kwargs})


def test_a_rehearsal_schedules_by_a_custom_resource_and_computes_on_cpus(monkeypatch):
    assert trials.gpu_resource() == "GPU"
    monkeypatch.setenv(trials.GPU_RESOURCE_ENV, "rehearsal_gpu")
    plan = trials.plan(
        [{"CPU": 4, "rehearsal_gpu": 1}], workers=1, gpus_per_trial=0.5, gpu=None, resource=trials.gpu_resource()
    )
    assert plan.worker_resources() == {"CPU": 1, "rehearsal_gpu": 0.5}
    assert plan.use_gpu and not plan.on_device and plan.concurrency == 2


def test_the_cli_refuses_a_gpu_shared_by_one_trials_workers(tiny_data, tmp_path):
    out = tmp_path / "s"
    result = CliRunner().invoke(
        app,
        ["tune", "--data", str(tiny_data), "--out", str(out), "--workers-per-trial", "2", "--gpus-per-trial", "1"],
    )
    assert_one_error_line(result, "NCCL")
    assert not out.exists()
