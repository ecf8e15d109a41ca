"""Where a set's distance from real images lies: the sampler or the pixels.

    python benchmarks/quality_pixels.py RUN --data DATA \
        --settings "normal;;1" "gmm;1,1.2,1.2,1.2;1" "gmm;1,1.2,1.2,1.2;0.7"

RUN is a trained class-conditional run, DATA its prepared dataset with its
judge (`vae-ray classifier train --data DATA`). Prints, in the judge's
features against the whole real test split: precision, recall and the
Frechet distance of real training images, of the model's reconstructions of
them (every style of the real data is in their latents, so what they miss is
the decoder's), and of --num samples for each setting
"PRIOR;GROUP_TEMPERATURES;PIXEL_TEMPERATURE" (the images `generate` writes
with those options, unfiltered, classes in turn), with the share the judge
reads as their label and how far the pixel values' distribution is from the
training images' (the mean distance between 201 quantiles, [0, 1] units).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True)
    parser.add_argument("--num", type=int, default=10_000)
    parser.add_argument("--settings", nargs="*", default=["normal;;1", "normal;;0.7"])
    args = parser.parse_args()

    import vae_ray
    from vae_ray import judge
    from vae_ray.data import read_arrays, read_meta
    from vae_ray.metrics import frechet_distance, precision_recall

    meta = read_meta(args.data)
    found = judge.load(args.data, meta)
    if found is None:
        raise SystemExit(f"{args.data}: no judge; run `vae-ray classifier train --data {args.data}` first")
    scorer = found[0]
    test, _ = read_arrays(args.data, "test", meta=meta)
    train, train_labels = read_arrays(args.data, "train", meta=meta)
    real_features, _ = judge.features_and_probs(scorer, test)
    pick = np.random.default_rng(0).choice(len(train), min(args.num, len(train)), replace=False)
    quantiles = np.linspace(0, 1, 201)
    real_pixels = np.quantile(train[pick[:5000]].astype(np.float32) / 255, quantiles)

    def report(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        features, probs = judge.features_and_probs(scorer, images)
        precision, recall = precision_recall(real_features, features, k=3)
        pixels = np.abs(np.quantile(images.astype(np.float32) / 255, quantiles) - real_pixels).mean()
        print(
            f"{name:44s} precision {precision:.3f}  recall {recall:.3f}  "
            f"FD {frechet_distance(features, real_features):6.3f}  "
            f"label read {float((probs.argmax(1) == labels).mean()):.4f}  pixel quantiles {pixels:.4f}",
            flush=True,
        )

    model = vae_ray.load(args.run)
    images, labels = train[pick], train_labels[pick]
    report("real training images", images, labels)
    conditional = bool(model.classes) and model.config.get("conditional")
    recon = np.concatenate(
        [
            model.reconstruct(images[i : i + 500], list(labels[i : i + 500]) if conditional else None)
            for i in range(0, len(images), 500)
        ]
    )
    report("their reconstructions (posterior means)", recon, labels)
    classes = np.arange(args.num) % len(model.classes)
    for setting in args.settings:
        prior, groups, pixel = (setting.split(";") + ["", "", "1"])[:3]
        sampled = model.sample(
            args.num, prior=prior or "normal", group_temperatures=groups or None, pixel_temperature=float(pixel or 1)
        )
        report(f"samples: {setting}", sampled, classes)


if __name__ == "__main__":
    main()
