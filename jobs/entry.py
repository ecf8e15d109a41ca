"""A thin Ray Job entry point for users who submit with `ray job submit` directly.

    ray job submit --address http://HEAD:8265 \
        --runtime-env-json '{"working_dir": "jobs", "pip": ["vae-ray"]}' -- \
        python entry.py '{"command": "train", "kwargs": {"settings": {"data": "s3://b/data/mnist", "out": "s3://b/runs/r1"}}}'

It runs the same function `vae-ray ... --submit` runs (`python -m
vae_ray.jobs`), with one job spec: {"command": train|tune|generate|evaluate,
"kwargs": {...}}. Prints the command's summary as one JSON line; exits 0 on
success, 2 on a bad spec or input, 1 when the run fails.
"""

import sys

from vae_ray.jobs import entry

if __name__ == "__main__":
    sys.exit(entry(sys.argv))
