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
import re
from pathlib import Path

import ray
import ray._private.worker as ray_worker

from vae_ray import compat
from vae_ray.cluster import _logs_dir, _route_raylet_messages_to_log


def test_the_raylet_message_printer_is_where_vae_ray_wraps_it():
    assert list(inspect.signature(ray_worker.print_to_stdstream).parameters)[:2] == ["data", "ignore_prefix"]
    _route_raylet_messages_to_log()
    assert getattr(ray_worker.print_to_stdstream, "_vae_ray_filtered", False)


def test_the_session_log_folder_is_reachable(ray_cluster):
    assert hasattr(ray_worker.global_worker, "node")
    assert _logs_dir().endswith("logs") and ray.is_initialized()


def test_the_ray_release_is_in_the_tested_range():
    """pyproject.toml's ray range is the tested one: `make test` runs the suite
    against its newest release, `make test-ray-range` against its oldest,
    the lower bound vae_ray/compat.py knows the differences from."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    found = re.search(r'"ray\[data,train,tune,default\]>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text)
    assert found, "pyproject.toml asks for ray[data,train,tune,default]>=A.B,<C.D"
    a, b, c, d = map(int, found.groups())
    assert (a, b) == compat.OLDEST == (2, 53) and (c, d) == (2, 61)
    assert compat.OLDEST <= compat.ray_release() < (c, d), f"Ray {ray.__version__} is outside the tested range"
    assert compat.ray_release("2.53.1") == (2, 53) and compat.ray_release("3.0.0.dev0") > (c, d)


def test_checkpoints_upload_in_the_background_where_ray_train_can():
    """RaySession.report asks for Ray Train V2's background upload when
    ray.train.report takes it (Ray Train then deletes the folder); on a
    Ray without it the report stays synchronous and the caller deletes it."""
    import ray.train

    from vae_ray.session import async_upload

    arguments = async_upload()
    if "checkpoint_upload_mode" in inspect.signature(ray.train.report).parameters:
        assert arguments["checkpoint_upload_mode"] == ray.train.CheckpointUploadMode.ASYNC
        assert arguments["delete_local_checkpoint_after_upload"] is True
    else:
        assert arguments == {}


def test_a_users_mistake_raised_in_a_ray_task_is_found_in_what_ray_raises(ray_cluster):
    """ray.get raises RayTaskError(UserError), an instance of both whose text
    is Ray's header: the user's own line is the one recovered."""
    from vae_ray.errors import UserError, user_error_in

    @ray.remote(num_cpus=0)
    def refuse():
        raise UserError("s3://bucket/set: shard 3 does not match its checksum")

    try:
        ray.get(refuse.remote())
    except Exception as exc:  # noqa: BLE001 - what Ray raises is the subject
        found = user_error_in(exc)
    assert str(found) == "s3://bucket/set: shard 3 does not match its checksum"
    assert user_error_in(RuntimeError("not the user's")) is None
