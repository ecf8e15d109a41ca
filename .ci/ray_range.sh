#!/usr/bin/env bash
# The oldest Ray release vae-ray supports, tested: the fast tier plus a smoke
# run of train (two ranks streaming through Ray Data), tune (ASHA stopping
# trials, their workers freed), generate (a Ray Data actor pool) and a job
# submitted through the Jobs SDK to a head with token authentication. It runs
# in a virtual environment of its own, .venv-ray-oldest, kept between runs and
# brought up to date when pyproject.toml or this script changes. The newest
# release is the one `make test` runs in .venv.
#
# The release is pyproject.toml's lower bound (`ray[...]>=2.X`) at its latest
# patch; RAY_VERSION=2.X.Y picks another. `--build-only` stops once the
# environment is ready.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${RAY_RANGE_VENV:-.venv-ray-oldest}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
OLDEST=$(sed -n 's/.*"ray\[[^]]*\]>=\([0-9][0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$OLDEST" ] || { echo "ray_range: no ray>=X.Y lower bound in pyproject.toml" >&2; exit 2; }
RAY_VERSION=${RAY_VERSION:-$OLDEST.*}

stamp() { printf '%s ray==%s torch==%s' "$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)" "$RAY_VERSION" "$TORCH_VERSION"; }

build() {
    local started=$SECONDS
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    # The CPU build of torch first, as `make install` does (the default Linux
    # wheel pulls several GB of CUDA packages).
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        "$VENV/bin/pip" install -q --no-deps --no-index "torch==$TORCH_VERSION" 2>/dev/null \
            || "$VENV/bin/pip" install -q --no-deps "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
    fi
    # vae-ray itself (editable, this checkout) with its test extra, against
    # the pinned release: pip fails here when pyproject.toml's requirements
    # cannot be met together with it.
    "$VENV/bin/pip" install -q "ray[data,train,tune,default]==$RAY_VERSION" -e ".[test]"
    stamp >"$VENV/.installed"
    echo "ray_range: built $VENV in $((SECONDS - started)) s"
}

if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$(stamp)" ]; then
    build
fi
[ "${1:-}" = "--build-only" ] && exit 0

PY="$VENV/bin/python"
echo "ray_range: $("$PY" -c 'import ray, torch; print(f"ray {ray.__version__}, torch {torch.__version__}")')"

started=$SECONDS
# The fast tier, as `make test-fast` runs it. cluster.yaml's image is the
# newest release's (the one `make test` checks it against).
"$PY" -m pytest -q -p no:cacheprovider -m "smoke or not (ray or subprocess or browser or slow)" \
    --deselect tests/test_deploy.py::test_cluster_yaml_has_the_launcher_fields
fast=$((SECONDS - started))

started=$SECONDS
"$PY" -m pytest -q -p no:cacheprovider \
    tests/test_ray_range.py::test_a_job_goes_through_the_jobs_sdk_with_the_token \
    tests/test_ray_internals.py::test_the_session_log_folder_is_reachable \
    tests/test_train.py::test_two_ranks_streaming_agree_on_steps_and_reshuffle_every_epoch \
    tests/test_generate.py::test_png_counts_layout_and_determinism_across_actor_counts \
    tests/test_tune.py::test_grid_runs_to_completion_with_early_stopping
smoke=$((SECONDS - started))
echo "ray_range: ray $("$PY" -c 'import ray; print(ray.__version__)'): fast tier ${fast} s, smoke ${smoke} s (wall)"
