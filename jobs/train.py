"""Ray Job entry point for training: `python jobs/train.py '<json>'`.

The JSON holds {"config": <TrainConfig fields>, "resume": bool}: the same
resolved config the CLI builds, so a job reproduces the local command.
Prints the run summary as one JSON line.
"""

from __future__ import annotations

import json
import sys

from vae_ray.config import TrainConfig
from vae_ray.errors import RunFailed, UserError
from vae_ray.train import fit


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python jobs/train.py '<json args>'", file=sys.stderr)
        return 2
    try:
        args = json.loads(argv[1])
        summary = fit(TrainConfig.from_dict(args["config"]), resume=bool(args.get("resume")), show=False)
    except (UserError, json.JSONDecodeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
