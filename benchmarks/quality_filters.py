"""Which --min-confidence rule keeps the best part of an unfiltered set.

    vae-ray generate RUN --num 20000 --per-class --format hf --out GEN ...   # without --min-confidence
    python benchmarks/quality_filters.py GEN --data DATA [--num 4000]

DATA is the set's prepared dataset with both judges (`vae-ray classifier
train --data DATA` and `--seed 1`). Each rule keeps the images whose label
the filtering judge (seed 1) gives at least a threshold: one probability for
every class (0.9, 0.99, or a percentile of the real test images'), or one
per class (the same percentile within each class; `generate --min-confidence
auto` is the 5th). From what each rule keeps, --num images with the classes
in equal shares are scored against as many real test images in the seed-0
judge's features (precision, recall, Frechet distance: equal sizes, since
all three move with the count). Filtering this way is what `generate` does
with a first candidate; `generate` redraws the rejected ones instead, so its
sets have these figures' character, not their exact values.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gen", help="an unfiltered labelled set (any format)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--num", type=int, default=4000)
    parser.add_argument("--percentiles", default="2,5,10,20")
    args = parser.parse_args()

    from vae_ray import judge
    from vae_ray.data import read_arrays, read_meta
    from vae_ray.genplan import CONFIDENCE_PERCENTILE, auto_class_confidences, confidence_values
    from vae_ray.metrics import frechet_distance, precision_recall
    from vae_ray.quality import read_generated

    meta = read_meta(args.data)
    judges = [judge.load(args.data, meta, seed) for seed in (0, 1)]
    if None in judges:
        raise SystemExit(f"{args.data}: train both judges first (vae-ray classifier train, and with --seed 1)")
    (scorer, _), (filterer, _) = judges
    fake, labels, _ = read_generated(args.gen)
    if (labels < 0).any():
        raise SystemExit(f"{args.gen}: an unlabelled set; these rules filter by label")
    test, test_labels = read_arrays(args.data, "test", meta=meta)
    classes = len(meta["classes"])

    def label_probability(images: np.ndarray, of: np.ndarray) -> np.ndarray:
        return judge.features_and_probs(filterer, images)[1][np.arange(len(of)), of]

    confidence, real = label_probability(fake, labels), label_probability(test, test_labels)
    features = judge.features_and_probs(scorer, fake)[0]
    rng = np.random.default_rng(0)
    real_features = judge.features_and_probs(scorer, test[rng.choice(len(test), args.num, replace=False)])[0]

    rules = {"none": np.zeros(classes), "0.9": np.full(classes, 0.9), "0.99": np.full(classes, 0.99)}
    for q in (float(v) for v in args.percentiles.split(",")):
        rules[f"all classes, p{q:g} ({np.percentile(real, q):.3f})"] = np.full(classes, np.percentile(real, q))
        if q == CONFIDENCE_PERCENTILE:
            per_class = confidence_values(auto_class_confidences(real, test_labels, classes))
            rules[f"per class, p{q:g} (--min-confidence auto)"] = np.array(per_class)
        else:
            rules[f"per class, p{q:g}"] = np.array([np.percentile(real[test_labels == k], q) for k in range(classes)])
    print(f"{args.gen}: {len(fake):,} images; each rule scored on {args.num:,} of what it keeps")
    print(f"{'rule':40s} {'kept':>6s} {'least kept, a class':>20s} {'precision':>9s} {'recall':>7s} {'FD':>8s}")
    for name, thresholds in rules.items():
        keep = confidence >= thresholds[labels]
        share = args.num // classes
        picks = [np.flatnonzero(keep & (labels == k)) for k in range(classes)]
        pick = np.concatenate([rng.choice(p, min(share, len(p)), replace=False) for p in picks])
        precision, recall = precision_recall(real_features, features[pick], k=3)
        fd = frechet_distance(features[pick], real_features)
        least = min(keep[labels == k].mean() for k in range(classes))
        print(f"{name:40s} {keep.mean():6.1%} {least:20.1%} {precision:9.3f} {recall:7.3f} {fd:8.3f}")


if __name__ == "__main__":
    main()
