"""Experiment tracking read back with the real readers: TensorBoard's
EventAccumulator, and a real `mlflow server` on loopback read with MlflowClient.
(A search's parent and child MLflow runs are checked in test_tune.py.)"""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_every_run_writes_tensorboard_scalars_and_pictures(trained_run):
    events = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in (
        "train/loss",
        "train/kl",
        "test/matlab_elbo",
        "test/neg_elbo_nats",
        "optim/lr",
        "speed/train_images_per_s",
        "scale/workers",
    ):
        assert tag in tags["scalars"], tag
    elbo = events.Scalars("test/matlab_elbo")
    assert [e.step for e in elbo] == [1, 2] and all(e.value > 0 for e in elbo)
    assert [e.value for e in events.Scalars("scale/workers")] == [1.0, 1.0]
    assert {"samples", "reconstructions"} <= set(tags["images"])
    assert events.Images("samples")[-1].width > 8 * 28 and events.Images("samples")[-1].step == 2


def test_a_run_logs_params_metrics_and_artifacts_to_mlflow(trained_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    logged = client.get_run((trained_run.parent / "mlflow_run_id").read_text())
    assert logged.info.status == "FINISHED" and logged.data.tags["vae_ray.run"] == str(trained_run)
    assert logged.data.params["latent_dim"] == "4" and logged.data.params["lr_schedule"] == "onecycle"
    history = client.get_metric_history(logged.info.run_id, "test_matlab_elbo")
    assert sorted(m.step for m in history) == [1, 2]
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} >= {"checkpoint", "plots", "samples"}
    assert "model.safetensors" in {
        a.path.split("/")[-1] for a in client.list_artifacts(logged.info.run_id, "checkpoint")
    }
