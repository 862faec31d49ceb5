"""Whole runs only: which runs fit a time budget, from a measured calibration.json.

`python -m experiments.device_suite --parts=calibrate` measures, on the machine at hand, the
ms per training step of resnet20 and resnet56 alone and with 2 and 4 runs at once (with and
without CUDA MPS), and what a run costs beyond its steps (process start-up, compilation,
evaluations, the final checkpoint). A run's prediction is

    ms/step of its net at the concurrency it will run at x its steps + start-up + overhead,

other depths interpolated linearly in depth between the measured nets. A run starts only
if its prediction ends inside the budget; otherwise it is left for the next invocation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from resnet_jax.errors import UserError

from .records import read_json


def depth_of(model: str) -> int:
    digits = re.sub(r"\D", "", model)
    return int(digits) if digits else 0


def _interpolate(points: dict[int, float], depth: int) -> float:
    """Linear in depth through the two nearest measured depths (one: proportional)."""
    if depth in points:
        return points[depth]
    known = sorted(points)
    if len(known) == 1:
        return points[known[0]] * depth / known[0]
    lo, hi = (known[0], known[1]) if depth < known[0] else (known[-2], known[-1]) if depth > known[-1] else next(
        (a, b) for a, b in zip(known, known[1:]) if a <= depth <= b)
    value = points[lo] + (points[hi] - points[lo]) * (depth - lo) / (hi - lo)
    return max(value, min(points.values()) * 0.1)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What calibration.json says, checked.

    Attributes:
      step_ms: (concurrency, mps) -> {depth: ms per step of one of the runs at once}.
      startup_s: process launch to a ready JAX backend.
      overhead_s: {depth: a run's seconds beyond its steps (compilation, evaluations, checkpoint)}.
      mps_works: whether runs under CUDA MPS worked on the calibrated machine.
      path: where it was read from (for messages).
    """

    step_ms: dict[tuple[int, bool], dict[int, float]]
    startup_s: float
    overhead_s: dict[int, float]
    mps_works: bool
    path: str = ""

    @classmethod
    def load(cls, path: str) -> Calibration:
        """Raises UserError (one line) for a missing or malformed file."""
        data = read_json(path)
        if not isinstance(data, dict):
            raise UserError(f"--calibration: {path} is missing or not JSON (python -m experiments.device_suite "
                            "--parts=calibrate writes it)")
        try:
            step_ms = {}
            for row in data["concurrency"]:
                points = {depth_of(m): float(ms) for m, ms in row["ms_per_step"].items() if ms is not None}
                if points:
                    step_ms[(int(row["k"]), bool(row["mps"]))] = points
            overhead = {depth_of(m): float(s) for m, s in data["overhead_s"].items()}
            startup = float(data["startup_s"])
            mps_works = bool((data.get("mps") or {}).get("works"))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UserError(f"--calibration: {path} is malformed ({type(error).__name__}: {error})") from None
        if (1, False) not in step_ms or not overhead or any(
                not math.isfinite(v) or v <= 0 for points in step_ms.values() for v in points.values()):
            raise UserError(f"--calibration: {path} is malformed (needs positive ms/step for one run alone)")
        return cls(step_ms, startup, overhead, mps_works, path)

    def step_ms_at(self, model: str, concurrency: int, mps: bool = False) -> float:
        """ms per step of `model` while `concurrency` runs share the machine: the smallest
        calibrated concurrency >= it, or the largest scaled up as time-sharing would."""
        levels = sorted(k for k, m in self.step_ms if m == mps) or sorted(k for k, m in self.step_ms if not m)
        mode = mps if any(m == mps for _, m in self.step_ms) else False
        above = [k for k in levels if k >= concurrency]
        k = above[0] if above else levels[-1]
        ms = _interpolate(self.step_ms[(k, mode)], depth_of(model))
        return ms * (concurrency / k if not above else 1)

    def run_s(self, model: str, steps: int, concurrency: int, mps: bool = False) -> float:
        """Predicted seconds of one whole run."""
        return (self.step_ms_at(model, concurrency, mps) * steps / 1e3 + self.startup_s
                + _interpolate(self.overhead_s, depth_of(model)))

    def best_concurrency(self, models: Sequence[str], most: int = 8) -> tuple[int, bool]:
        """(runs at once, under MPS) with the most steps done per second for this mix of nets."""
        options = [(k, m) for k, m in self.step_ms if k <= most and (self.mps_works or not m)]

        def per_step(option):  # wall ms per step of work, all slots busy
            k, m = option
            return sum(self.step_ms_at(model, k, m) for model in models) / len(models) / k

        return min(options, key=lambda o: (per_step(o), o[0]))


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run's place in the plan: `start` at `begin_s` for `predicted_s`, or left."""

    name: str
    predicted_s: float
    begin_s: float
    start: bool


def plan(runs: Sequence[tuple[str, str, int]], calibration: Calibration, budget_s: float, concurrency: int,
         mps: bool = False) -> list[Planned]:
    """Which of `runs` ((name, model, steps), in the order they should run) fit `budget_s`
    with `concurrency` slots; each predicted at that concurrency throughout (a run that ends
    with fewer beside it only finishes sooner)."""
    free = [0.0] * concurrency
    out = []
    for name, model, steps in runs:
        predicted = calibration.run_s(model, steps, concurrency, mps)
        slot = min(range(concurrency), key=free.__getitem__)
        begin = free[slot]
        fits = begin + predicted <= budget_s
        if fits:
            free[slot] = begin + predicted
        out.append(Planned(name, predicted, begin, fits))
    return out
