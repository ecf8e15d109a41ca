#!/usr/bin/env bash
# The GPU figures in one command, on a bare machine that has CUDA PyTorch but
# neither Ray nor vae-ray, and no internet:
#
#   benchmarks/gpu_bundle.sh BUNDLE          # here: packages + data + these scripts, in one folder
#   (copy BUNDLE to the GPU machine)
#   BUNDLE/gpu_suite.sh                      # there: unpacks BUNDLE/site.tar.xz, runs, writes BUNDLE/report
#
#   BUNDLE/gpu_suite.sh --cifar              # there: the CIFAR-10 quality run instead (another call)
#   BUNDLE/gpu_suite.sh --dry-run            # anywhere with torch: the bundle itself checked on the CPU
#   benchmarks/gpu_suite.sh --dry-run [--cifar]   # where vae-ray is installed: the steps on the CPU, tiny sizes
#
# The carried packages go on PYTHONPATH in front of the machine's own, so its
# CUDA build of torch (never carried) is the one imported; Ray's worker
# processes inherit the path.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi

if [ ! -f "$HERE/site.tar.xz" ]; then
    # In the repository: checked where the project is installed (the test suite runs this).
    [ -n "$DRY" ] || { echo "no site.tar.xz beside gpu_suite.sh: build a bundle with benchmarks/gpu_bundle.sh" >&2; exit 2; }
    DATA="${VAE_RAY_GPU_SUITE_DATA:-$HERE/../../shared/data}"
    OUT="${VAE_RAY_GPU_SUITE_OUT:-$(mktemp -d)}"
    exec "$PY" "$HERE/gpu_suite.py" --data "$DATA" --out "$OUT" --dry-run "$@"
fi

[ -n "$DRY" ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
SITE="$HERE/site"
if [ ! -f "$SITE/.unpacked" ]; then
    rm -rf "$SITE" && mkdir -p "$SITE/bin"
    tar -C "$SITE" -xJf "$HERE/site.tar.xz"
    printf '#!%s\nimport sys\nfrom vae_ray.cli import main\nsys.exit(main())\n' "$(command -v "$PY")" >"$SITE/bin/vae-ray"
    chmod +x "$SITE/bin/vae-ray"
    touch "$SITE/.unpacked"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
exec "$PY" "$HERE/gpu_suite.py" --data "$HERE/data" --out "$HERE/report" $DRY "$@"
