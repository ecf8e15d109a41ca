"""The Hugging Face dataset card (README.md) of a generated set in `--format hf`."""

from __future__ import annotations

import json
from typing import Any

from .formats import hf_features
from .genplan import CONFIDENCE_PERCENTILE


def dataset_card(manifest: dict[str, Any]) -> str:
    """A Hugging Face dataset card (README.md) for a generated set."""
    plan, dataset = manifest["plan"], manifest["dataset"]
    features = hf_features(dataset["classes"] if plan["labels"] != "none" else None)
    lines = [
        "---",
        "tags:",
        "- synthetic",
        "- vae-ray",
        "- image",
        "task_categories:",
        "- unconditional-image-generation" if plan["labels"] == "none" else "- image-classification",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/train-*",
        "dataset_info:",
        "  features:",
        "  - name: image",
        "    dtype: image",
    ]
    if "label" in features:
        lines += ["  - name: label", "    dtype:", "      class_label:", "        names:"]
        lines += [f"          '{k}': {json.dumps(name)}" for k, name in enumerate(features["label"]["names"])]
    lines += [
        "  - name: index",
        "    dtype: int64",
        "  splits:",
        "  - name: train",
        f"    num_examples: {manifest['count']}",
        "---",
        "",
    ]
    evaluation = manifest.get("evaluation") or {}
    figures = (
        "\n".join(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in evaluation.items())
        or "| (none saved) | |"
    )
    body = f"""# Synthetic {dataset["name"]} images ({manifest["count"]:,})

Images decoded by a variational autoencoder with `vae-ray generate`; none of
them is a real {dataset["name"]} image.

| | |
|---|---|
| images | {manifest["count"]:,} ({dataset["shape"][0]}x{dataset["shape"][1]}, {dataset["shape"][2]} channel(s), PNG) |
| labels | {"image i has label i mod " + str(len(dataset["classes"])) if plan["labels"] == "per-class" else ("class " + plan["labels"] if plan["labels"] != "none" else "none (an unconditional model)")} |
| seed | {plan["seed"]} (image i depends only on the checkpoint, the seed, i and its label) |
| temperature | {plan["temperature"]:g}{_groups_text(plan)} ({_prior_text(plan)}) |
{_pixel_row(plan)}{_filter_row(manifest)}| checkpoint | `{manifest["checkpoint"]}` |
| checkpoint SHA-256 | `{manifest["checkpoint_sha256"]}` |
| model | {manifest["config"]["arch"]} network, latent {manifest["config"]["latent_dim"]}, {manifest["config"]["loss"]} loss{", class-conditional" if manifest["config"]["conditional"] else ""} |
| trained on | {dataset["name"]} |

## The model's evaluation figures

| figure | value |
|---|---|
{figures}

## Loading

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files="data/*.parquet", split="train")
```

`_manifest.json` lists every shard with its checksum; `vae-ray generate --verify DIR` checks them.
"""
    return "\n".join(lines) + body


def _groups_text(plan: dict[str, Any]) -> str:
    found = plan.get("group_temperatures")
    return f", times {found.replace(',', ', ')} in the latent groups, top first" if found else ""


def _pixel_row(plan: dict[str, Any]) -> str:
    found = plan.get("pixel_temperature", 1.0)
    if found == 1.0:
        return ""
    return (
        f"| pixel temperature | {found:g} (each pixel's Bernoulli likelihood tempered: sigmoid(logit / {found:g})) |\n"
    )


def _prior_text(plan: dict[str, Any]) -> str:
    if plan.get("prior", "normal") == "gmm":
        return (
            "z's first latent group from a Gaussian mixture fitted to the training images' codes, each "
            f"component's spread scaled by T; mixture SHA-256 `{plan['prior_sha256'][:12]}`"
        )
    return "z ~ N(0, T^2 I)"


def _filter_row(manifest: dict[str, Any]) -> str:
    found = manifest.get("filter")
    if not found:
        return ""
    rules = []
    if found.get("class_confidences"):
        per_class = ", ".join(found["class_confidences"].split(","))
        rules.append(
            f"a judge classifier (weights SHA-256 `{found['judge_sha256'][:16]}...`) was as sure of its label "
            f"(unlabelled: its likeliest class) as of {100 - CONFIDENCE_PERCENTILE:g}% of that class's real test "
            f"images (--min-confidence auto; per class: {per_class})"
        )
    elif found["min_confidence"]:
        rules.append(
            f"a judge classifier (weights SHA-256 `{found['judge_sha256'][:16]}...`) gave its label (unlabelled: "
            f"any class) probability >= {found['min_confidence']:g}"
        )
    if found["max_copy_distance"]:
        rules.append(
            f"it was farther than {found['max_copy_distance']:g} (pixel L2, [0, 1] units) from every training "
            f"image ({found['copies_dropped']:,} candidates dropped as near-copies)"
        )
    return (
        f"| filter | kept an image only when {' and '.join(rules)}: {found['acceptance_rate']:.1%} of "
        f"{found['candidates']:,} candidates kept; {found['unmet']:,} images are the nearest to passing of "
        f"{found['max_candidates']} candidates |\n"
    )
