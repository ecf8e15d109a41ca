"""Ray Job entry point: `python entry.py '<job spec json>'`.

`vae-ray train|tune|generate|evaluate --submit` sends this folder as the
job's working directory and the command's resolved settings as its one
argument, e.g. {"command": "train", "config": {<TrainConfig fields>}}.
Prints the command's summary as one JSON line; exits 0 on success, 2 on a
bad spec or input, 1 when the run fails.
"""

import sys

from vae_ray.jobs import entry

if __name__ == "__main__":
    sys.exit(entry(sys.argv))
