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


def _logger(tmp_path, tiny_data, background=True):
    from vae_ray.config import TrainConfig
    from vae_ray.data import read_meta, summary
    from vae_ray.model import build
    from vae_ray.spec import ModelSpec
    from vae_ray.tracking import EpochLogger
    from vae_ray.trainer import resolve

    meta = read_meta(str(tiny_data))
    cfg = resolve(TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), latent_dim=4), meta)
    dataset = summary(meta)
    model = build(ModelSpec.from_config(cfg, dataset))
    return EpochLogger(str(tmp_path / "run"), {}, cfg, dataset, background=background), model


def test_an_epochs_logging_runs_beside_the_next_epoch_and_its_errors_still_surface(tmp_path, tiny_data):
    """The pictures are drawn at once; the writes happen on a background
    thread, in order, at most one epoch behind; close() finishes them; an
    error there stops the run at the next epoch instead of being lost."""
    import threading
    import time

    import pytest
    import torch

    logger, model = _logger(tmp_path, tiny_data)
    where, original = [], logger._log

    def slow_log(metrics, samples, pairs):
        time.sleep(0.5)
        where.append((metrics["epoch"], threading.current_thread().name))
        original(metrics, samples, pairs)

    logger._log = slow_log
    started = time.perf_counter()
    logger.epoch({"epoch": 1, "test_matlab_elbo": 30.0}, model, torch.device("cpu"))
    assert time.perf_counter() - started < 0.4 and where == []  # returned before the writes
    logger.epoch({"epoch": 2, "test_matlab_elbo": 20.0}, model, torch.device("cpu"))  # waits for epoch 1's
    assert [e for e, _ in where] == [1]
    logger.close()
    assert [e for e, _ in where] == [1, 2] and all(name.startswith("vae-ray-epoch-log") for _, name in where)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("test/matlab_elbo")] == [(1, 30.0), (2, 20.0)]

    failing, model = _logger(tmp_path / "second", tiny_data)

    def broken(*_):
        raise OSError("disk full")

    failing.writer.add_scalar = broken
    failing.epoch({"epoch": 1, "test_matlab_elbo": 30.0}, model, torch.device("cpu"))
    with pytest.raises(OSError, match="disk full"):
        failing.epoch({"epoch": 2, "test_matlab_elbo": 20.0}, model, torch.device("cpu"))
    failing.close()
    # A run already ending on its own error keeps that error: the logging one is only logged.
    behind, model = _logger(tmp_path / "third", tiny_data)
    behind.writer.add_scalar = broken
    behind.epoch({"epoch": 1, "test_matlab_elbo": 30.0}, model, torch.device("cpu"))
    behind.close(failing=True)
    assert behind.closed


def test_a_search_trial_logs_each_epoch_before_it_reports(tmp_path, tiny_data):
    import torch

    logger, model = _logger(tmp_path, tiny_data, background=False)
    logger.epoch({"epoch": 1, "test_matlab_elbo": 30.0}, model, torch.device("cpu"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("test/matlab_elbo")] == [1]  # written before epoch() returned
    logger.close()
