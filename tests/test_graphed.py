"""The CUDA-graph training step (vae_ray/graphed.py). Capture itself needs a
GPU (benchmarks/step_profile.py and the GPU suite run it); here the same
static-buffer step runs uncaptured and must train exactly as the eager step,
and the rules for when a run is captured and how a resume keeps its optimizer."""

import copy

import pytest
import torch

from vae_ray import graphed
from vae_ray.config import TrainConfig
from vae_ray.model import build
from vae_ray.spec import ModelSpec
from vae_ray.trainer import resolve
from vae_ray.worker import Run, autocast_for, lr_at, make_optimizer, train_step

DATASET = {"name": "t", "shape": [28, 28, 1], "num_classes": 10}
META = {"root": "-", "shape": [28, 28, 1], "num_classes": 10, "splits": {"train": {"count": 96}}}


def _runs(cfg: TrainConfig):
    cfg = resolve(cfg, META)  # the architecture's own recipe, as `train` resolves it
    torch.manual_seed(0)
    core = build(ModelSpec.from_config(cfg, DATASET))
    runs = []
    for _ in range(2):
        model = copy.deepcopy(core)
        averaged = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
        runs.append(Run(cfg, model, model, averaged, make_optimizer(cfg, model), 1, torch.device("cpu"), 16, 4, 12))
    return runs


@pytest.mark.parametrize("loss", ["bernoulli", "matlab"])
def test_the_static_step_trains_exactly_as_the_eager_step(loss):
    # A learning-rate schedule, a KL warm-up, the weight average and clipping:
    # every per-step value the graph reads from a device tensor changes.
    cfg = TrainConfig(
        data="-",
        arch="mnist",
        latent_dim=4,
        batch_size=16,
        loss=loss,
        lr=3e-3,
        lr_schedule="onecycle",
        kl_warmup_epochs=2,
        ema=0.9,
        grad_clip=1.0,
        epochs=3,
    )
    eager, static = _runs(cfg)
    cfg = eager.cfg
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randint(0, 256, (16, 28, 28, 1), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (16,), generator=g),
        )
        for _ in range(6)
    ]
    binarize = loss == "bernoulli"
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step_of = graphed.StaticStep(static, binarize, capture=False)
    losses = {"eager": [], "static": []}
    for name, run in (("eager", eager), ("static", static)):
        torch.manual_seed(7)  # the same Bernoulli targets and latent noise in both
        for i, (images, labels) in enumerate(batches):
            beta = min(1.0, (i + 1) / 8)
            if name == "eager":
                terms, step_loss = train_step(
                    run, images, labels, beta, scaler, autocast_for("fp32", run.device), binarize
                )
            else:
                terms, step_loss = step_of(images, labels, lr_at(cfg, run.global_step, run.total_steps), beta)
            losses[name] += [step_loss.item(), terms.kl.sum().item()]
    assert static.global_step == eager.global_step == 6
    assert losses["static"] == pytest.approx(losses["eager"], rel=1e-5)
    for a, b in zip(eager.core.parameters(), static.core.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager.averaged.parameters(), static.averaged.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The optimizer reads the learning rate from the step's tensor, moved by the schedule.
    assert static.optimizer.param_groups[0]["lr"] is step_of.lr
    assert step_of.lr.item() == pytest.approx(eager.optimizer.param_groups[0]["lr"], rel=1e-6)


def test_which_runs_are_captured():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = TrainConfig(data="-")
    assert graphed.blocker(cfg, cuda, 1, "memory") is None
    assert graphed.blocker(TrainConfig(data="-", precision="bf16"), cuda, 1, "memory") is None
    assert graphed.blocker(cfg, cpu, 1, "memory") == "not on a GPU"
    assert graphed.blocker(cfg, cuda, 2, "memory") == "more than one worker (DDP)"
    assert graphed.blocker(cfg, cuda, 1, "stream") == "streamed batches"
    assert graphed.blocker(TrainConfig(data="-", precision="fp16"), cuda, 1, "memory") == "fp16 loss scaling"
    assert graphed.blocker(TrainConfig(data="-", cuda_graph="off"), cuda, 1, "memory") == "--cuda-graph off"


def test_a_resume_keeps_the_optimizer_this_run_chose():
    """A checkpoint written under a CUDA graph carries capturable Adam's flags
    and a tensor learning rate; resumed on a CPU they would stop the first step."""
    cfg = TrainConfig(data="-", arch="mnist", latent_dim=4)
    (run, _) = _runs(cfg)
    cfg = run.cfg
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = torch.randint(0, 256, (16, 28, 28, 1), dtype=torch.uint8)
    labels = torch.zeros(16, dtype=torch.long)
    train_step(run, images, labels, 1.0, scaler, autocast_for("fp32", run.device), False)
    saved = run.optimizer.state_dict()
    for group in saved["param_groups"]:
        group.update(capturable=True, foreach=True, lr=torch.tensor(1e-3))

    def resumed(keep: bool):
        fresh = make_optimizer(cfg, run.core)
        flags = graphed.implementation(fresh)
        fresh.load_state_dict(copy.deepcopy(saved))
        if keep:
            graphed.keep_implementation(fresh, flags)
        run.optimizer = fresh
        train_step(run, images, labels, 1.0, scaler, autocast_for("fp32", run.device), False)
        return fresh

    with pytest.raises((RuntimeError, AssertionError), match="capturable"):
        resumed(keep=False)
    kept = resumed(keep=True)
    assert kept.param_groups[0]["capturable"] is False
    assert all(s["step"].device.type == "cpu" and s["step"].item() == 2 for s in kept.state.values())
