"""What a generated set is worth: the README's recipe, judged against real MNIST.

    python benchmarks/quality_synthetic.py                           # --loss bernoulli, 10 epochs, 20,000 images
    python benchmarks/quality_synthetic.py --loss matlab             # the MATLAB example's loss
    python benchmarks/quality_synthetic.py --epochs 2 --num 2000 --limit 6000   # a quick look
    python benchmarks/quality_synthetic.py --arch hvae --prior gmm --group-temperatures 1,1.2,1.2,1.2 \
        --pixel-temperature 0.7 --min-confidence auto --max-copy-distance auto   # the README's recipe
    python benchmarks/quality_synthetic.py --arch hvae --prior gmm              # z from a fitted mixture

Runs, as a user would:
    vae-ray data prepare mnist --source ../shared/data/mnist --out D
    vae-ray classifier train --data D                              (the judge, seed 0)
    vae-ray train --data D --out R --conditional --epochs 10 [--arch A --loss L]
    vae-ray generate R --num 20000 --per-class --format hf --out G
    vae-ray evaluate-set G --data D                                (classifiers of seed 1)
then prints each figure of issue "Synthetic sets worth training on" beside its goal:
TSTR/TRTR >= 0.99, recall >= 0.8, precision >= 0.9, Frechet distance over
real-train-vs-real-test <= 5, near-copies no more than real test images have.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import EXE, mnist_source

GOALS = {"tstr_ratio": (">=", 0.99), "recall": (">=", 0.8), "precision": (">=", 0.9), "fd_ratio": ("<=", 5.0)}


def run(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([EXE, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="MNIST IDX files (default ../shared/data/mnist)")
    parser.add_argument("--arch", default="auto")
    parser.add_argument("--loss", default="bernoulli")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num", type=int, default=20_000)
    parser.add_argument("--limit", type=int, help="prepare only the first N images of each split")
    parser.add_argument("--temperature", type=float, default=1.0, help="generate --temperature")
    parser.add_argument("--min-confidence", default="0", help="generate --min-confidence: auto or P (judge seed 1)")
    parser.add_argument("--max-copy-distance", default="0", help="generate --max-copy-distance")
    parser.add_argument("--prior", default="normal", help="generate --prior (gmm: fitted once, kept in the run)")
    parser.add_argument("--group-temperatures", default="", help="generate --group-temperatures (hvae)")
    parser.add_argument("--pixel-temperature", type=float, default=1.0, help="generate --pixel-temperature")
    parser.add_argument("--keep", help="keep the work folders here (and reuse its dataset and judge)")
    args = parser.parse_args()
    filtering = args.min_confidence.strip().lower() == "auto" or float(args.min_confidence) > 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        # One dataset and judge for every recipe kept in the same folder (prepare and classifier
        # train find theirs complete); a run and a set per recipe.
        recipe = f"{args.arch}-{args.loss}-{args.epochs}"
        sampling = [
            *(["--temperature", str(args.temperature)] if args.temperature != 1.0 else []),
            *(["--min-confidence", args.min_confidence] if filtering else []),
            *(["--max-copy-distance", args.max_copy_distance] if args.max_copy_distance != "0" else []),
            *(["--prior", args.prior] if args.prior != "normal" else []),
            *(["--group-temperatures", args.group_temperatures] if args.group_temperatures else []),
            *(["--pixel-temperature", str(args.pixel_temperature)] if args.pixel_temperature != 1.0 else []),
        ]
        suffix = "".join(sampling).replace("--", "-")
        data, run_dir, gen = work / "mnist", work / f"run-{recipe}", work / f"gen-{recipe}-{args.num}{suffix}"
        limit = ["--limit", str(args.limit)] if args.limit else []
        run("data", "prepare", "mnist", "--source", args.source or mnist_source(), "--out", str(data), *limit)
        if not (data / "classifier" / "info.json").is_file():  # a kept folder's judge is reused
            run("classifier", "train", "--data", str(data))
        if filtering and not (data / "classifier" / "seed-1" / "info.json").is_file():
            run("classifier", "train", "--data", str(data), "--seed", "1")  # the filter's judge: not the scorer
        train_s = run(
            "train",
            "--data",
            str(data),
            "--out",
            str(run_dir),
            "--conditional",
            "--epochs",
            str(args.epochs),
            "--arch",
            args.arch,
            "--loss",
            args.loss,
        )
        gen_s = run(
            "generate",
            str(run_dir),
            "--num",
            str(args.num),
            "--per-class",
            "--format",
            "hf",
            "--out",
            str(gen),
            *sampling,
        )
        done = subprocess.run(
            [EXE, "evaluate-set", str(gen), "--data", str(data), "--json"], check=True, capture_output=True, text=True
        )
        figures = json.loads(done.stdout)
    print(
        f"recipe: --arch {args.arch} --loss {args.loss}, {args.epochs} epochs (train {train_s:.0f} s), "
        f"{args.num:,} images (generate {gen_s:.0f} s{', ' + ' '.join(sampling) if sampling else ''}), "
        f"evaluate-set {figures['seconds']:.0f} s"
    )
    if figures.get("filter"):
        print(
            f"filter: {figures['filter']['acceptance_rate']:.1%} of {figures['filter']['candidates']:,} candidates kept"
        )
    rows = [
        (
            "TSTR / TRTR",
            figures["tstr_ratio"],
            "tstr_ratio",
            f"{figures['tstr_accuracy']:.4f} / {figures['trtr_accuracy']:.4f}",
        ),
        ("recall", figures["recall"], "recall", f"real train: {figures['recall_real']:.3f}"),
        ("precision", figures["precision"], "precision", f"real train: {figures['precision_real']:.3f}"),
        ("Frechet distance / real", figures["fd_ratio"], "fd_ratio", f"{figures['fd']:.3f} / {figures['fd_real']:.3f}"),
    ]
    for name, value, key, detail in rows:
        sign, goal = GOALS[key]
        met = value >= goal if sign == ">=" else value <= goal
        print(f"{name:28s} {value:8.3f}   goal {sign} {goal:<5}  {'met' if met else 'NOT met'}   ({detail})")
    for space in ("pixels", "features"):
        copies = figures[f"near_copies_{space}"]
        met = copies["fraction"] <= copies["fraction_real"]
        print(
            f"near-copies ({space:8s})      {copies['fraction']:8.4f}   goal <= {copies['fraction_real']:.4f} "
            f"(real test)  {'met' if met else 'NOT met'}"
        )
    print(
        "mixing (synthetic share: accuracy): "
        + ", ".join(f"{m['synthetic_share']:.2f}: {m['accuracy']:.4f}" for m in figures["mixing"] or [])
    )
    print(f"Inception Score {figures['inception_score']:.3f} (real test {figures['inception_score_real']:.3f})")
    json.dump(figures, sys.stderr)
    print(file=sys.stderr)


if __name__ == "__main__":
    main()
