"""A run of an experiment as a `configs/cifar.py` variant, and the flags every experiment shares.

A `RunSpec` is exactly one `python -m resnet_jax.main` command (`RunSpec.command`), which the
experiment prints beside every result so that any cell of its tables can be reproduced alone.
Nothing heavy is imported here, so bad flags fail before JAX loads.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Sequence
from typing import Any

from absl import flags

from resnet_jax.errors import UserError

# resnet_jax.models.resnet's PREACT_BOTTLENECK_MIN_DEPTH (not imported: it would load JAX
# before a bad flag is told).
PREACT_BOTTLENECK_MIN_DEPTH = 164


def cifar_block(depth: int, preact: bool = False) -> str | None:
    """"bottleneck", "basic" or None: the residual unit configs/cifar.py builds a net of
    `depth` from (resnet_jax.models.resnet's rule, restated here without importing it):
    pre-activation nets (`preact`) take bottleneck units at 9n+2 from 164 (164, 1001), every
    net basic units at 6n+2 from 8."""
    if preact and depth >= PREACT_BOTTLENECK_MIN_DEPTH and (depth - 2) % 9 == 0:
        return "bottleneck"
    if depth >= 8 and (depth - 2) % 6 == 0:
        return "basic"
    return None


CONFIG_FILE = "configs/cifar.py"  # resolves to the installed recipe from any directory
MAIN = "python -m resnet_jax.main"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment: one `python -m resnet_jax.main` command.

    Attributes:
      name: its workdir's name inside the experiment's folder (e.g. "plain20_seed0").
      variant: the configs/cifar.py variant, e.g. "plain20,short,npz".
      overrides: config fields set on top, {"data.path": ..., "train.seed": 1}.
      devices: the device count it needs (0: whatever this process has); a CPU process
        with another count runs it as a subprocess with that many simulated devices.
      info: what the experiment wants in its results row ({"type": "plain", "depth": 20}).
    """

    name: str
    variant: str
    overrides: tuple[tuple[str, Any], ...] = ()
    devices: int = 0
    info: tuple[tuple[str, Any], ...] = ()

    def args(self, workdir: str) -> list[str]:
        """resnet_jax.main's flags for this run in `workdir`."""
        return ([f"--config={CONFIG_FILE}:{self.variant}"]
                + [f"--config.{key}={value}" for key, value in self.overrides] + [f"--workdir={workdir}"])

    def env(self) -> dict[str, str]:
        """Environment variables the command needs (the simulated device count)."""
        if not self.devices:
            return {}
        flags_now = os.environ.get("XLA_FLAGS", "")
        return {"XLA_FLAGS": f"{flags_now} --xla_force_host_platform_device_count={self.devices}".strip()}

    def command(self, workdir: str) -> str:
        """The shell command that trains exactly this run."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env().items())
        return " ".join(filter(None, [env, MAIN, *map(shlex.quote, self.args(workdir))]))

    def config(self):
        """The ConfigDict resnet_jax.main builds from `args` (the same parser)."""
        from resnet_jax import cli  # ml_collections and the config schema: not needed to parse flags

        return cli.config_from_args(self.args(""))


def make_run(name: str, variant: str, overrides: dict | None = None, devices: int = 0, **info: Any) -> RunSpec:
    return RunSpec(name, variant, tuple((overrides or {}).items()), devices, tuple(info.items()))


def define_flags(flag_values: flags.FlagValues, schedules: Sequence[str], default_schedule: str = "paper") -> None:
    """The flags every training experiment has: --workdir, --schedule, --data, --seeds, and
    how its runs share the machine: --concurrent, --calibration, --budget_s, --records."""
    flags.DEFINE_string("workdir", None, "Experiment folder: one workdir per run, tables, figures, results.json.",
                        flag_values=flag_values)
    flags.DEFINE_enum("schedule", default_schedule, list(schedules),
                      "A schedule variant of configs/cifar.py (`resnet-jax configs` describes them).",
                      flag_values=flag_values)
    flags.DEFINE_string("data", None, "tfds | npz:PATH | synthetic (default: the schedule's; synthetic for smoke).",
                        flag_values=flag_values)
    flags.DEFINE_integer("seeds", 1, "Seeds per configuration: 0 .. N-1.", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_string("concurrent", "1", "Runs at once, each a resnet_jax.main process sharing the accelerator "
                        "(CUDA MPS where nvidia-cuda-mps-control exists); 'auto': the best of --calibration.",
                        flag_values=flag_values)
    flags.DEFINE_string("calibration", "", "calibration.json of `python -m experiments.device_suite "
                        "--parts=calibrate`: for --concurrent=auto and --budget_s.", flag_values=flag_values)
    flags.DEFINE_float("budget_s", 0, "Seconds this invocation may train (0: no limit). Only whole runs whose "
                       "calibrated prediction fits are started; the rest are left for the next invocation.",
                       lower_bound=0, flag_values=flag_values)
    flags.DEFINE_list("records", None, "Folders of finished runs' records (config.json, metrics.jsonl, done.json; "
                      "no checkpoints), one subfolder per run. Runs recorded there are skipped; runs finished now "
                      "are copied into the first. Tables are built from the records.", flag_values=flag_values)


def parse_concurrent(value: str) -> int | str:
    """--concurrent: a number >= 1, or "auto".

    Raises:
      UserError: anything else.
    """
    value = str(value).strip()
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"--concurrent: {value!r} is neither a number of runs >= 1 nor 'auto'")
    return int(value)


def parse_records(values: Sequence[str] | None) -> list[str]:
    """--records folders, absolute; each must exist (the first receives new records).

    Raises:
      UserError: a folder that does not exist.
    """
    out = []
    for value in values or ():
        path = os.path.abspath(os.path.expanduser(value.strip()))
        if not os.path.isdir(path):
            raise UserError(f"--records: no such folder: {path} (mkdir -p it for a first invocation)")
        out.append(path)
    return out


def parse_data(spec: str | None) -> tuple[str, dict]:
    """--data -> (source option of the variant or "", overrides): "npz:PATH" ->
    ("npz", {"data.path": absolute PATH}); None -> ("", {}) (the schedule's source).

    Raises:
      UserError: an unknown source or a missing file.
    """
    if not spec:
        return "", {}
    kind, _, path = spec.partition(":")
    if kind == "npz":
        if not path:
            raise UserError("--data=npz needs a file: --data=npz:/path/to/cifar10.npz")
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise UserError(f"--data: file not found: {path}")
        return "npz", {"data.path": path}
    if kind in ("tfds", "synthetic") and not path:
        return kind, {}
    raise UserError(f"--data={spec!r}: use tfds, synthetic or npz:PATH")


def parse_depths(values: Sequence[str] | None, default: Sequence[int], flag: str = "--depths",
                 preact: bool = False) -> list[int]:
    """["20", "56"] -> [20, 56], sorted, without repeats; each a CIFAR depth 6n+2 >= 8, or
    for pre-activation nets (`preact`) also a bottleneck depth 9n+2 from 164 (164, 1001):
    the depths configs/cifar.py builds for resnet/plain<d> and preresnet/preplain<d>."""
    if not values:
        return sorted(default)
    depths = set()
    for item in values:
        item = str(item).strip()
        depth = int(item) if item.isdigit() else 0
        if cifar_block(depth, preact) is None:
            raise UserError(f"{flag}: {item!r} is not a pre-activation CIFAR depth: 6n+2 (8, 14, 20, ..., 110) or "
                            f"a bottleneck depth 9n+2 from 164 (164, 173, ..., 1001)" if preact else
                            f"{flag}: {item!r} is not a CIFAR depth 6n+2 (8, 14, 20, ..., 56, ..., 110, ..., 1202)")
        depths.add(depth)
    return sorted(depths)
