#!/usr/bin/env bash
# Build the folder gpu_suite.sh runs from on a machine without internet:
#   BUNDLE/wheels/  vae-ray and every requirement but torch (the GPU machine has its CUDA build)
#   BUNDLE/data/    mnist/ (the IDX files) and cifar10-jpeg.tar.gz, when found beside the checkout
#   BUNDLE/gpu_suite.sh, gpu_suite.py, step_profile.py
# Usage: benchmarks/gpu_bundle.sh BUNDLE [PYTHON_VERSION, default 3.11]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
BUNDLE="${1:?usage: gpu_bundle.sh BUNDLE [PYTHON_VERSION]}"
PYV="${2:-3.11}"
PY="${PYTHON:-python3}"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/data"
"$PY" -m pip wheel -q --no-deps -w "$BUNDLE/wheels" "$REPO"
# Requirements for Linux x86_64 and the GPU machine's Python, torch excluded.
"$PY" -m pip download -q -d "$BUNDLE/wheels" --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version "$PYV" "ray[data,train,tune,default]>=2.60,<2.61" numpy pyarrow pillow typer rich pyyaml \
    matplotlib tensorboardX "safetensors>=0.4.3"
SHARED="$REPO/../shared/data"
[ -d "$SHARED/mnist" ] && cp -r "$SHARED/mnist" "$BUNDLE/data/"
[ -f "$SHARED/cifar10-jpeg/cifar10-jpeg.tar.gz" ] && cp "$SHARED/cifar10-jpeg/cifar10-jpeg.tar.gz" "$BUNDLE/data/"
cp "$HERE/gpu_suite.sh" "$HERE/gpu_suite.py" "$HERE/step_profile.py" "$BUNDLE/"
du -sh "$BUNDLE"
