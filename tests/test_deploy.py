"""The cluster-launcher config and the KubeRay manifest parse and carry
what a cluster needs."""

import json
import re
import shlex
from pathlib import Path

import yaml

from vae_ray.commands import validate
from vae_ray.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_has_the_launcher_fields():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for key in (
        "cluster_name",
        "max_workers",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "docker",
    ):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    head = nodes[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert gpu and all(0 <= n["min_workers"] <= n["max_workers"] <= cfg["max_workers"] for n in gpu)
    assert all(re.match(r"(g5|g6|g6e|p4d|p5)\.", n["node_config"]["InstanceType"]) for n in gpu)
    import ray

    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-") and "gpu" in cfg["docker"]["image"]
    assert any("pip install" in c and "vae-ray" in c for c in cfg["setup_commands"])
    text = (REPO / "cluster.yaml").read_text()
    assert "s3://" in text and text.count("#") > 15  # storage and comments on each block


def test_rayjob_manifest_runs_the_packaged_entry_point_with_a_valid_spec():
    doc = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["python", "-m", "vae_ray.jobs"]
    job = json.loads(words[3])
    assert job["command"] == "train"
    validate(job)  # the checks a submission makes before sending
    settings = TrainConfig.from_dict(job["kwargs"]["settings"])
    assert settings.data.startswith("s3://") and settings.out.startswith("s3://")  # no shared volume needed
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].startswith("rayproject/ray:")
    workers = cluster["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert (REPO / "jobs" / "entry.py").is_file()  # the thin script for `ray job submit` users
