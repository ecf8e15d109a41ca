#!/usr/bin/env bash
# Build the folder gpu_suite.sh runs from on a machine without internet:
#   BUNDLE/site.tar.xz  vae-ray and every requirement but torch, installed for the GPU machine's
#                       Python (pip --target), Ray without its Java jars, RLlib and Ray LLM (Python
#                       Ray Data, Train and Tune use none of them); xz keeps it near 40 MB
#   BUNDLE/data/        mnist/ (the IDX files) from ../shared/data; with CIFAR=1 cifar10-jpeg.tar.gz
#                       instead (the --cifar call needs nothing else, and both would not fit 64 MiB)
#   BUNDLE/gpu_suite.sh, gpu_suite.py, step_profile.py
# Usage: benchmarks/gpu_bundle.sh BUNDLE [PYTHON_VERSION, default 3.12]
# SKIP="name ..." leaves out packages the GPU machine already has (its own
# versions are then used): the default is the large ones a CUDA PyTorch image
# usually holds, which keeps the bundle under a 64 MiB transfer. SKIP="" carries all.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
BUNDLE="${1:?usage: gpu_bundle.sh BUNDLE [PYTHON_VERSION]}"
PYV="${2:-3.12}"
PY="${PYTHON:-python3}"
SKIP="${SKIP-numpy pyarrow pandas matplotlib pillow grpcio fonttools kiwisolver contourpy pygments pyyaml aiohttp}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$BUNDLE/data" "$WORK/wheels" "$WORK/site"
"$PY" -m pip wheel -q --no-deps -w "$WORK/wheels" "$REPO"
# Requirements for Linux x86_64 and the GPU machine's Python, torch excluded.
"$PY" -m pip download -q -d "$WORK/wheels" --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version "$PYV" --implementation cp "ray[data,train,tune,default]>=2.60,<2.61" numpy pyarrow \
    pillow typer rich pyyaml matplotlib tensorboardX "safetensors>=0.4.3"
for name in $SKIP; do
    pattern="$(echo "$name" | tr '-' '_')"
    find "$WORK/wheels" -maxdepth 1 -iname "${pattern}-[0-9]*.whl" -delete
done
"$PY" -m pip install -q --no-deps --no-compile --target "$WORK/site" --platform manylinux2014_x86_64 \
    --python-version "$PYV" --implementation cp --only-binary=:all: "$WORK"/wheels/*.whl
# Console scripts name this machine's interpreter: gpu_suite.sh writes its own.
# Neither the dashboard's web pages (Ray logs that they are missing and goes on) nor virtualenv
# (pip runtime environments) are used by the suite's local clusters.
rm -rf "$WORK/site/bin" "$WORK/site/ray/jars" "$WORK/site/ray/rllib" "$WORK/site/ray/llm" \
    "$WORK/site/ray/dashboard/client/build" "$WORK/site"/virtualenv*
tar -C "$WORK/site" -cf - . | xz -T0 -6 >"$BUNDLE/site.tar.xz"
SHARED="$REPO/../shared/data"
if [ "${CIFAR:-0}" = 1 ]; then
    cp "$SHARED/cifar10-jpeg/cifar10-jpeg.tar.gz" "$BUNDLE/data/"
elif [ -d "$SHARED/mnist" ]; then
    cp -r "$SHARED/mnist" "$BUNDLE/data/" && chmod -R u+w "$BUNDLE/data/mnist"
fi
cp "$HERE/gpu_suite.sh" "$HERE/gpu_suite.py" "$HERE/step_profile.py" "$BUNDLE/"
du -sh "$BUNDLE"
