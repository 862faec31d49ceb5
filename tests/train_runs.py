"""Run as a script in a subprocess with N fake devices: several tiny training runs one after
the other in one process (one JAX start-up, and one compilation of the programs they share,
for all of them), each exactly what `python -m resnet_jax.main --config=configs/digits.py:resnet8
--workdir=DIR` with helpers.cli_args(overrides) trains. Each run's stdout goes to DIR.stdout:

    python train_runs.py '[["DIR", {"parallel.backend": "pmap", ...}], ...]'
"""

import contextlib
import json
import sys

from helpers import tiny_config
from resnet_jax import train

if __name__ == "__main__":
    for workdir, overrides in json.loads(sys.argv[1]):
        with open(workdir + ".stdout", "w") as out, contextlib.redirect_stdout(out):
            train.train_and_evaluate(tiny_config(**overrides), workdir)
