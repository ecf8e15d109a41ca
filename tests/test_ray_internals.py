"""The few places vae-ray reaches into Ray where Ray has no public API.
Each is written down here; when a Ray release changes one, this fails
loudly instead of the feature quietly doing nothing.

- cluster._route_raylet_messages_to_log wraps ray._private.worker.print_to_stdstream
  (the raylet's startup-concurrency warnings reach every driver's stdout,
  whatever log_to_driver says);
- cluster._logs_dir reads the private cluster's session log folder from
  ray._private.worker.global_worker.node (copied into a failed run).
"""

import inspect

import ray
import ray._private.worker as ray_worker

from vae_ray.cluster import _logs_dir, _route_raylet_messages_to_log


def test_the_raylet_message_printer_is_where_vae_ray_wraps_it():
    assert list(inspect.signature(ray_worker.print_to_stdstream).parameters)[:2] == ["data", "ignore_prefix"]
    _route_raylet_messages_to_log()
    assert getattr(ray_worker.print_to_stdstream, "_vae_ray_filtered", False)


def test_the_session_log_folder_is_reachable(ray_cluster):
    assert hasattr(ray_worker.global_worker, "node")
    assert _logs_dir().endswith("logs") and ray.is_initialized()


def test_the_ray_release_is_the_tested_one():
    from importlib.metadata import requires

    spec = next(r for r in requires("vae-ray") if r.startswith("ray"))
    assert ">=2.60" in spec and "<2.61" in spec and ray.__version__.startswith("2.60.")
