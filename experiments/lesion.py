"""Lesion study (Veit et al. 2016, "Residual Networks Behave Like Ensembles of Relatively
Shallow Networks"): test error of a trained net with blocks deleted, plain vs residual.

    python -m experiments.lesion --workdir=/tmp/an_plain20 --workdir=/tmp/an_resnet20 \\
        --out=/tmp/lesion

For every workdir, on its first evaluation split (or --split): the error of the intact net;
with each single block deleted (Veit et al. Fig. 3); and with k blocks deleted at random,
k = 1 ... all deletable blocks, --draws draws each (their Fig. 5). Blocks are deleted by
configuration (`ResNet(drop_blocks=...)`) on the checkpoint's own variables: a deleted
residual block becomes its shortcut (exactly the block with a zero residual branch); a
plain net has no shortcut, so a deleted plain block becomes the identity, which is only
possible where the block keeps the shape -- its strided, widening blocks cannot be deleted
and are reported as such. Evaluation uses the checkpoint's BN statistics, unaugmented.

Writes OUT/lesion.json and OUT/lesion.png.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import analysis_common as common
from resnet_jax.errors import UserError

FLAGS = flags.FlagValues()  # the module's own: the analyses can share a process (tests)
flags.DEFINE_multi_string("workdir", None, "A trained run (repeat for several, e.g. plain and residual).",
                          flag_values=FLAGS)
flags.DEFINE_string("out", None, "Where lesion.json and lesion.png go.", flag_values=FLAGS)
flags.DEFINE_string("split", None, "A name from the run's data.eval_splits or a split spec (default: the "
                    "run's first eval split).", flag_values=FLAGS)
flags.DEFINE_integer("draws", 5, "Random draws of k deleted blocks, for each k.", flag_values=FLAGS)
flags.DEFINE_integer("examples", 0, "Evaluate on this many examples of the split, drawn by --seed "
                     "(0 = all).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the random deletions (and of --examples).", flag_values=FLAGS)
flags.DEFINE_integer("batch", 500, "Examples per forward pass.", flag_values=FLAGS)
flags.DEFINE_string("checkpoint", "latest", "latest, best or a step number.", flag_values=FLAGS)


class Evaluator:
    """Loss and error of one run's checkpoint on fixed examples, for any set of deleted
    blocks; each distinct set is compiled and evaluated once."""

    def __init__(self, run: common.Run, inputs: np.ndarray, labels: np.ndarray, batch: int):
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        x, y, mask = common.batched(inputs, labels, batch, multiple_of=len(mesh.devices))
        # Each batch split over the devices; jit partitions the forward pass accordingly.
        split = NamedSharding(mesh, P(None, "data"))
        self.data = (jax.device_put(x, split), jax.device_put(y, split), jax.device_put(mask, split))
        self.variables = jax.device_put(run.variables, NamedSharding(mesh, P()))
        self.run, self.results = run, {}

    def __call__(self, dropped) -> tuple[float, float]:
        key = tuple(sorted(int(i) for i in dropped))
        if key not in self.results:
            model = self.run.model.clone(drop_blocks=key)
            evaluate = jax.jit(lambda v, x, y, m: common.loss_and_error(model, v, x, y, m))
            loss, error = evaluate(self.variables, *self.data)
            self.results[key] = (float(loss), float(error))
        return self.results[key]


def lesion(run: common.Run, split: str | None = None, *, draws: int = 5, examples: int = 0, seed: int = 0,
           batch: int = 500) -> dict:
    """One run's lesion study (the numbers lesion.json keeps).

    Returns:
      {"workdir", "label", "model", "skip", "step", "split" ({"name", "spec"}), "examples",
      "block_names", "deletable", "baseline_error", "baseline_loss", "chance_error",
      "single": [{"block", "name", "error", "loss"} (error None where the block cannot be
      deleted, with "reason")], "random": [{"k", "draws" (block lists), "errors"}],
      "evaluations", "seconds"}.
    """
    named = run.eval_splits()
    if split is None:
        if not named:
            raise UserError(f"{run.workdir} has no data.eval_splits; pass --split=SPEC")
        split = next(iter(named))
    spec = named.get(split, split)
    images, labels = common.subset(*run.load(spec), examples, seed)
    start = time.perf_counter()
    evaluate = Evaluator(run, run.normalize(images), labels, batch)
    names, deletable = run.model.block_names(), run.model.deletable_blocks()
    baseline_loss, baseline_error = evaluate(())

    single = []
    for index, name in enumerate(names):
        if index in deletable:
            loss, error = evaluate((index,))
            single.append({"block": index, "name": name, "error": error, "loss": loss})
        else:
            single.append({"block": index, "name": name, "error": None, "loss": None,
                           "reason": "a plain block that changes the shape has no shortcut to replace it"})

    rng = np.random.default_rng(seed)
    random = []
    for k in range(1, len(deletable) + 1):
        chosen = [sorted(int(i) for i in rng.choice(deletable, k, replace=False)) for _ in range(draws)]
        random.append({"k": k, "draws": chosen, "errors": [evaluate(blocks)[1] for blocks in chosen]})
    return {
        "workdir": os.path.abspath(run.workdir), "label": run.name, "model": run.config.model.name,
        "skip": bool(run.model.skip), "step": run.step, "split": {"name": split, "spec": spec},
        "examples": int(len(labels)), "block_names": names, "deletable": deletable,
        "baseline_error": baseline_error, "baseline_loss": baseline_loss,
        "chance_error": 1.0 - 1.0 / run.config.data.num_classes,
        "single": single, "random": random,
        "evaluations": len(evaluate.results), "seconds": round(time.perf_counter() - start, 2),
    }


def run(argv: list[str]) -> int:
    """The command: parses flags, lesions every workdir, writes the JSON and the PNG."""
    common.parse_flags(FLAGS, argv, __doc__)
    if not FLAGS.workdir:
        raise UserError("--workdir is required (repeat it to compare runs), e.g. --workdir=runs/r20")
    if not FLAGS.out:
        raise UserError("--out is required: the folder for lesion.json and lesion.png")
    if FLAGS.draws < 1 or FLAGS.batch < 1 or FLAGS.examples < 0:
        raise UserError("--draws and --batch must be >= 1, --examples >= 0")
    loaded = [common.load_run(w, FLAGS.checkpoint) for w in FLAGS.workdir]  # all bad input first

    runs = []
    for one in loaded:
        result = lesion(one, FLAGS.split, draws=FLAGS.draws, examples=FLAGS.examples, seed=FLAGS.seed,
                        batch=FLAGS.batch)
        singles = [s["error"] for s in result["single"] if s["error"] is not None]
        blocked = len(result["single"]) - len(singles)
        print(f"{result['label']} on {result['split']['spec']} ({result['examples']} images): intact error "
              f"{100 * result['baseline_error']:.2f} %; one block deleted: mean {100 * np.mean(singles):.2f} %, "
              f"worst {100 * np.max(singles):.2f} % ({len(singles)} blocks"
              + (f"; {blocked} shape-changing plain blocks cannot be deleted" if blocked else "")
              + f"); all {len(result['deletable'])} deletable deleted: "
              f"{100 * result['random'][-1]['errors'][0]:.2f} %; {result['evaluations']} evaluations in "
              f"{result['seconds']:.1f} s", flush=True)
        runs.append(result)

    from . import plots  # matplotlib: only once there is something to draw

    out = os.path.expanduser(FLAGS.out)
    os.makedirs(out, exist_ok=True)
    plots.lesion_png(runs, os.path.join(out, "lesion.png"))
    summary = {
        "command": " ".join(["python -m experiments.lesion", *argv[1:]]),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "devices": f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
        "draws": FLAGS.draws, "seed": FLAGS.seed,
        "method": ("blocks deleted by ResNet(drop_blocks=...): a residual block -> its shortcut, a "
                   "shape-preserving plain block -> the identity; top-1 error with the checkpoint's BN "
                   "statistics, no augmentation; block indices count from 0 at the input"),
        "files": {"figure": "lesion.png"}, "runs": runs,
    }
    with open(os.path.join(out, "lesion.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {os.path.join(out, 'lesion.json')} and lesion.png", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    common.cli(run, argv)


if __name__ == "__main__":
    main(sys.argv)
