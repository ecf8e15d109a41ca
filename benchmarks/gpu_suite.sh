#!/usr/bin/env bash
# The GPU figures in one command, on a bare machine that has CUDA PyTorch but
# neither Ray nor vae-ray, and no internet:
#
#   benchmarks/gpu_bundle.sh BUNDLE          # here: wheels + data + these scripts, in one folder
#   (copy BUNDLE to the GPU machine)
#   BUNDLE/gpu_suite.sh                      # there: installs from BUNDLE/wheels offline, runs, writes BUNDLE/report
#
#   BUNDLE/gpu_suite.sh --cifar              # there: the CIFAR-10 quality run instead (another call)
#   benchmarks/gpu_suite.sh --dry-run [--cifar]   # anywhere: the same steps on the CPU at a tiny size
#
# The venv sees the machine's own torch (--system-site-packages), so its CUDA
# build is kept; everything else comes from the wheels carried beside it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi

if [ -n "$DRY" ]; then
    # Checked where the project is installed (the test suite runs this).
    PY="${PYTHON:-python3}"
    DATA="${VAE_RAY_GPU_SUITE_DATA:-$HERE/../../shared/data}"
    OUT="${VAE_RAY_GPU_SUITE_OUT:-$(mktemp -d)}"
    exec "$PY" "$HERE/gpu_suite.py" --data "$DATA" --out "$OUT" --dry-run "$@"
fi

PY="${PYTHON:-python3}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
VENV="$HERE/venv"
if [ ! -x "$VENV/bin/vae-ray" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
    # When that python is itself a venv (an image's /opt/.../.venv holding
    # torch), --system-site-packages sees only the base interpreter's
    # packages: point the new venv at the parent's too, behind its own.
    PARENT="$("$PY" -c 'import site, sys; print(":".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")')"
    if [ -n "$PARENT" ]; then
        SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        echo "$PARENT" | tr ':' '\n' >"$SITE/parent-env.pth"
    fi
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$HERE/wheels" vae-ray
fi
PATH="$VENV/bin:$PATH" "$VENV/bin/python" "$HERE/gpu_suite.py" --data "$HERE/data" --out "$HERE/report" "$@"
