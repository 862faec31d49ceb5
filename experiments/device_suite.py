"""Everything a GPU or TPU can show about resnet_jax, from one command that keeps to a budget.

    python -m experiments.device_suite --out=DIR [--parts=bench,e2e,degradation] [--budget_s=480]
        [--tiny] [--data=CIFAR10.npz] [--bench=resnet56_b128,...] [--e2e_dispatch=1,8,65] [--reference=PATH]
        [--concurrent=K|auto] [--calibration=calibration.json]
    python -m experiments.device_suite --out=DIR --parts=calibrate [--tiny]

- calibrate (not in the default parts; no data needed): DIR/calibration.json, what a training
  run costs here alone and with 2 and 4 at once, with and without CUDA MPS
  (experiments.calibration; about 2 minutes on a GPU). The degradation part and
  `--concurrent=auto` read it; so does `python -m experiments.degradation --calibration=...`.

- bench: the bf16 synthetic train step of resnet50 (batch 256, 224 px), resnet56 (128),
  resnet20 (128) and resnet56 (1024), each beside the plain reference steps of
  experiments/reference.py run by this command on the same card: its Flax step, and
  torchvision (eager; torch.compile for resnet50) where torch imports and sees a GPU. ms/step,
  img/s, MFU, compile time, and the ratio to each reference. Each measurement is a process of
  its own (`python -m experiments.benchmark ...`, `python experiments/reference.py ...`), one
  at a time.
- e2e: resnet56 on the real CIFAR-10 (--data, an .npz: `python -m resnet_jax.data.cifar_npz`) with pad-crop-flip augmentation and an
  exact evaluation of test and test_exact every epoch, 3 epochs, once per steps-per-dispatch
  value (--e2e_dispatch; a chunk ends early at a log or evaluation, as in any run):
  end-to-end img/s as a percentage of the synthetic rate, and the time
  from launch to the first step.
- degradation: plain-20, plain-56, ResNet-20, ResNet-56 in the `gpu_paper` schedule of
  configs/cifar.py (the paper's 64k steps in bf16, evaluated every 1,000 steps, one checkpoint
  at the end), each a `python -m resnet_jax.main` command, up to --concurrent at once
  (experiments.runs.train_all); with a calibration.json only the runs predicted to finish
  inside the budget start, the rest are left for the next invocation.

It keeps to --budget_s: a measurement that cannot finish in time is not started; a training
run still going near the end gets SIGTERM, writes a checkpoint and exits 3. It then says what
is left and exits 3; the same command with the same --out continues where it stopped (finished
measurements are kept, stopped runs resume). DIR/results.json holds every number with the card,
the versions, the date and the command of each invocation; DIR/summary.md the tables.

--tiny: every part on CPU in well under 2 minutes (resnet8 on 16 px synthetic images, a few
steps; the reference runs its r8): checks the plumbing, measures nothing
worth quoting.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from absl import flags

from . import calibration as calibration_lib
from . import runs
from .runs import machine, records, supervise
from resnet_jax import cli
from resnet_jax.errors import PREEMPTED_EXIT, Preempted, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("calibrate", "bench", "e2e", "degradation")
DEFAULT_PARTS = ("bench", "e2e", "degradation")
# The plain Flax and torchvision steps the bench compares against, run as a script.
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.py")

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "Folder for results.json, summary.md, logs/ and the runs' workdirs.",
                    flag_values=FLAGS)
flags.DEFINE_list("parts", list(DEFAULT_PARTS), f"Which parts, in order: {', '.join(PARTS)} (calibrate: "
                  "calibration.json, see experiments.calibration).", flag_values=FLAGS)
flags.DEFINE_integer("budget_s", 480, "Seconds this invocation may take; it stops cleanly before.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_bool("tiny", False, "Every part on CPU in well under 2 minutes (tiny nets, synthetic data).",
                  flag_values=FLAGS)
flags.DEFINE_string("reference", "", "Another reference script with experiments/reference.py's arguments and "
                    "RESULT line (default: experiments/reference.py).", flag_values=FLAGS)
flags.DEFINE_string("data", "", "CIFAR-10 .npz for e2e and degradation (python -m resnet_jax.data.cifar_npz "
                    "makes one); without it those parts are left for later.", flag_values=FLAGS)
flags.DEFINE_list("e2e_dispatch", ["1", "8", "65"], "e2e: train.steps_per_dispatch values to run (0: auto; 8 is "
                  "resnet_jax/config.py's assumed accelerator value; 65 divides the 130-step log period).",
                  flag_values=FLAGS)
flags.DEFINE_list("bench", None, "bench: only these configurations (default all): resnet50_b256, resnet56_b128, "
                  "resnet20_b128, resnet56_b1024.", flag_values=FLAGS)
flags.DEFINE_string("concurrent", "1", "degradation: runs at once (a number, or 'auto': the best of "
                    "calibration.json).", flag_values=FLAGS)
flags.DEFINE_string("calibration", "", "calibration.json for the degradation part's plan and --concurrent=auto "
                    "(default: OUT/calibration.json when there is one).", flag_values=FLAGS)
flags.DEFINE_bool("torch", True, "bench: also the torchvision references where torch sees a GPU.", flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class Bench:
    """One synthetic-step configuration, ours beside the reference's `ref_model`."""

    model: str
    batch: int
    image_size: int
    ref_model: str  # experiments/reference.py's name: r50, r56, r20, r8

    @property
    def key(self) -> str:
        return f"{self.model}_b{self.batch}"


BENCHES = (Bench("resnet50", 256, 224, "r50"), Bench("resnet56", 128, 32, "r56"), Bench("resnet20", 128, 32, "r20"),
           Bench("resnet56", 1024, 32, "r56"))
# In --tiny the ratio checks the plumbing, not speed (the reference's r8 is on 32 px images).
TINY_BENCHES = (Bench("resnet8", 16, 16, "r8"),)
E2E_EPOCHS = 3
E2E_LOG_EVERY = 130  # 390 steps an epoch at batch 128: 3 windows an epoch


@dataclasses.dataclass
class Task:
    """One measurement or training run: a process, or a few, run one at a time."""

    key: str
    part: str
    min_s: float  # not started with less time than this left
    run: Callable[[Task, float], dict]  # (task, deadline) -> its record
    training: bool = False  # SIGTERM (checkpoint, exit 3) rather than a kill at the deadline


class Suite:
    def __init__(self, out: str, tiny: bool, budget_s: float, reference: str, data: str, argv: Sequence[str], *,
                 benches: Sequence[Bench] | None = None, dispatch: Sequence[int] | None = None, torch: bool = True,
                 concurrent: int | str = 1, calibration_path: str = ""):
        self.out, self.tiny, self.budget_s = out, tiny, budget_s
        self.benches_chosen = tuple(benches) if benches is not None else (TINY_BENCHES if tiny else BENCHES)
        self.dispatch_chosen = list(dispatch) if dispatch is not None else ([1] if tiny else [1, 8, 65])
        self.torch, self.concurrent, self.calibration_path = torch, concurrent, calibration_path
        self.machine: dict = {}
        self.reference, self.data = reference, data
        self.start = time.time()
        self.deadline = self.start + budget_s
        # Kept back at the end for writing results; a training run is sent SIGTERM this long
        # before its kill so it can write its checkpoint.
        self.margin_s, self.grace_s = (2.0, 6.0) if tiny else (10.0, 30.0)
        self.stop_signal: str | None = None
        self.path = os.path.join(out, "results.json")
        self.results = runs.read_json(self.path) or {}
        self.results.setdefault("tasks", {})
        self.results.setdefault("invocations", [])
        self.invocation = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "command": runs.command_line("experiments.device_suite", argv), "budget_s": budget_s,
                           "parts": [],
                           "finished": [], "stopped": [], "not_started": []}
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    # -----------------------------------------------------------------------------------
    # Processes.

    def log_path(self, key: str) -> str:
        return os.path.join(self.out, "logs", key.replace("/", "__") + ".log")

    def spawn(self, command: list[str], key: str, deadline: float, training: bool = False,
              env: dict | None = None, watch: Callable[[], None] | None = None) -> dict:
        """Runs `command` (cwd: the project root) with its output in logs/KEY.log until it
        exits or `deadline`: a training run gets SIGTERM `grace_s` before and a kill at the
        deadline; anything else gets SIGTERM at it and a kill 2 s later. A stop of the
        suite (a signal) reaches it as one SIGTERM.

        Returns:
          {"code", "seconds", "stopped" (by the budget or a signal), "log"}.
        """
        path = self.log_path(key)
        # A training run checkpoints on SIGTERM, so it gets one grace_s before the deadline.
        grace = self.grace_s if training else 2.0
        term_at, kill_at = (deadline - grace, deadline) if training else (deadline, deadline + grace)
        child = supervise.run(command, path, env, ROOT, term_at=term_at, kill_at=kill_at, grace_s=grace,
                              watch=watch, stop_when=lambda: self.stop_signal is not None)
        return {"code": child.code, "seconds": child.seconds, "stopped": child.stopped,
                "log": os.path.relpath(path, self.out)}

    def _forward(self, signum, _frame) -> None:
        """SIGTERM/SIGINT to the suite: `spawn` passes one SIGTERM to the running child (a
        training run then checkpoints; a second would make it exit at once), and nothing new
        starts."""
        self.stop_signal = signal.Signals(signum).name

    # -----------------------------------------------------------------------------------
    # The machine.

    def probe(self) -> dict:
        """The card, versions and torch's view, from a child process (this one never starts
        a JAX backend: on a GPU it would take memory the measurements need)."""
        try:
            return machine.probe(cwd=ROOT)
        except RuntimeError as error:
            raise UserError(str(error)) from None

    # -----------------------------------------------------------------------------------
    # bench.

    def bench_ours(self, bench: Bench, deadline: float, key: str) -> dict:
        steps, warmup = (3, 1) if self.tiny else (30, 5)
        rows = os.path.join(self.out, "logs", key.replace("/", "__") + ".jsonl")
        if os.path.exists(rows):
            os.remove(rows)
        command = [sys.executable, "-m", f"{__package__}.benchmark", f"--model={bench.model}", f"--batch={bench.batch}",
                   f"--image_size={bench.image_size}", "--dtype=bfloat16", f"--steps={steps}", f"--warmup={warmup}",
                   "--data=synthetic", f"--json={rows}"]
        proc = self.spawn(command, key, deadline)
        record = {"command": shlex.join(["python", *command[1:]]).replace(self.out + os.sep, "DIR/"), **proc}
        row = runs.read_json(rows) if proc["code"] == 0 else None
        if row:
            record.update({k: row.get(k) for k in ("ms_per_step", "images_per_sec", "compile_s", "tflops_per_sec",
                                                   "mfu", "device")})
        return record

    def bench_reference(self, bench: Bench, kind: str, deadline: float, key: str) -> dict:
        batch, steps = bench.batch, ["3"] if self.tiny else []
        command = [sys.executable, self.reference, kind, bench.ref_model, str(batch), *steps]
        proc = self.spawn(command, key, deadline)
        record = {"command": shlex.join(["python", os.path.relpath(self.reference, ROOT), *command[2:]]), **proc}
        with open(os.path.join(self.out, proc["log"])) as f:
            text = f.read()
        match = None
        for match in re.finditer(r"^RESULT (\S+) (\S+) B=(\d+) ([\d.]+) img/s ([\d.]+) ms/step", text, re.M):
            pass
        if proc["code"] == 0 and match:
            record.update(images_per_sec=float(match.group(4)), ms_per_step=float(match.group(5)))
        return record

    # -----------------------------------------------------------------------------------
    # e2e and degradation: resnet_jax.main runs.

    def train_run(self, run: runs.RunSpec, workdir: str, key: str, deadline: float,
                  watch: Callable[[], None] | None = None) -> dict:
        """`run`'s command in `workdir` until it finishes or the budget stops it (exit 3,
        checkpoint written); skipped when its record says it finished, and recorded
        (done.json) when it does: experiments.runs.records' protocol."""
        found = records.existing(run, workdir, log=lambda _: None)
        if found and not found.get("failed"):
            return {**found, "code": 0, "stopped": False}
        command = [sys.executable, "-m", "resnet_jax.main", *run.args(workdir)]
        proc = self.spawn(command, key, deadline, training=True, env=run.env(), watch=watch)
        step, results = runs.last_evaluation(workdir) if os.path.isdir(workdir) else (0, {})
        if proc["code"] == 0:
            record = records.finish(run, workdir, step, results, proc["seconds"], self.machine)
        else:
            record = {"name": run.name, "step": step, "total_steps": run.config().train.total_steps,
                      "results": results, "command": run.command(workdir), "minutes": proc["seconds"] / 60}
        return {**record, "checkpoint_step": checkpoint_step(workdir), **proc}

    def e2e(self, dispatch: int, deadline: float, key: str) -> dict:
        workdir = os.path.join(self.out, "e2e", f"spd{dispatch}")
        if self.tiny:  # resnet8 on the smoke schedule's 128 random 16 px images: 8 steps an epoch
            variant, overrides, log_every = "resnet8,smoke", {}, 4
            steps = 2 * 8
        else:
            variant, overrides, log_every = "resnet56,npz", {"data.path": self.data}, E2E_LOG_EVERY
            steps = E2E_EPOCHS * 390
        overrides.update({"train.total_steps": steps, "train.log_every": log_every, "train.eval_every": 0,
                          "train.checkpoint_every": steps, "train.keep_checkpoints": 1,
                          "train.steps_per_dispatch": dispatch, "train.progress": False})
        run = runs.make_run(f"e2e_spd{dispatch}", variant, overrides)
        if os.path.isdir(workdir) and not runs.read_json(os.path.join(workdir, "done.json")):
            import shutil

            shutil.rmtree(workdir)  # a stopped measurement starts again: its timings would mix
        arrivals: list[tuple[float, dict]] = []
        metrics, launch = os.path.join(workdir, "metrics.jsonl"), time.time()
        state = {"offset": 0}

        def watch() -> None:  # when each record of metrics.jsonl appears
            if not os.path.exists(metrics):
                return
            with open(metrics) as f:
                f.seek(state["offset"])
                chunk = f.read()
            complete = chunk[:chunk.rfind("\n") + 1]
            state["offset"] += len(complete)
            import json

            now = time.time()
            arrivals.extend((now, json.loads(line)) for line in complete.splitlines() if line.strip())

        record = self.train_run(run, workdir, key, deadline, watch)
        if record.get("code") == 0:  # measured: its checkpoints would only weigh on the way back
            import shutil

            shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
        train = [(t, r) for t, r in arrivals if r.get("split") == "train"]
        # The first record of each evaluation: from the end of the first epoch's (every
        # program compiled by then) to the end of the last's, so each epoch in the window
        # counts its evaluation and its checkpoint once.
        evals = sorted({r["step"]: t for t, r in reversed(arrivals) if r.get("split") != "train"}.items())
        if record.get("code") != 0 or len(train) < 3 or len(evals) < 2:
            return {**record, "launched": launch}
        import statistics

        batch = run.config().train.batch_size
        logged = statistics.median(r["images_per_sec"] for _, r in train[1:])
        (s0, t0), (s1, t1) = evals[0], evals[-1]
        wall = (s1 - s0) * batch / (t1 - t0)
        first_log, r0 = train[0][0] - launch, train[0][1]
        return {**record, "variant": variant, "batch": batch, "steps_per_dispatch": dispatch,
                "logged_images_per_sec": logged, "wall_images_per_sec": wall,
                "launch_to_first_log_s": first_log, "first_log_step": r0["step"],
                "launch_to_first_step_s": first_log - r0["step"] * batch / logged,
                "wall_window_steps": [s0, s1], "evaluations": [step for step, _ in evals]}

    def degradation_runs(self) -> list[runs.RunSpec]:
        from . import degradation

        if self.tiny:
            planned = degradation.plan("smoke", [8], 1, None)
        else:
            # Without data (not yet on the device machine) only the names are used: nothing runs.
            planned = degradation.plan("gpu_paper", [20, 56], 1, f"npz:{self.data}" if self.data else None)
        extra = (("train.keep_checkpoints", 1), ("train.progress", False))
        return [dataclasses.replace(r, overrides=r.overrides + extra) for r in planned]

    def calibration(self) -> runs.Calibration | None:
        path = self.calibration_path or os.path.join(self.out, "calibration.json")
        return runs.Calibration.load(path) if os.path.exists(path) else None

    def degradation(self, tasks: list[Task], deadline: float) -> dict[str, dict]:
        """The degradation runs of `tasks`, up to --concurrent at once (experiments.runs.train_all):
        with a calibration.json only those predicted to finish by `deadline` start."""
        wanted = {t.key.split("/", 1)[1] for t in tasks}
        planned = [(r, os.path.join(self.out, "degradation", r.name)) for r in self.degradation_runs()
                   if r.name in wanted]
        calibration = self.calibration()
        try:
            outcome = runs.train_all(
                planned, concurrent=self.concurrent, log=lambda line: print(f"[degradation] {line}", flush=True),
                budget_s=max(deadline - time.time(), 1) if calibration else 0, calibration=calibration,
                logs_dir=os.path.join(self.out, "logs"), cache_dir=os.path.join(self.out, "jax_cache"),
                grace_s=self.grace_s, cwd=ROOT, in_process=False, deadline=deadline,
                stop_when=lambda: self.stop_signal is not None)
        except Preempted:  # stopped by a signal: what finished is kept below
            outcome = runs.Outcome(done={r.name: d for r, w in planned
                                         if (d := records.existing(r, w, log=lambda _: None))},
                                   left={r.name: "stopped by a signal" for r, w in planned})
        out = {}
        for run, workdir in planned:
            if run.name in outcome.done and not outcome.done[run.name].get("failed"):
                out[run.name] = {**outcome.done[run.name], "code": 0, "stopped": False,
                                 "checkpoint_step": checkpoint_step(workdir), "log": f"logs/{run.name}.log",
                                 "seconds": outcome.done[run.name].get("seconds", 0)}
            else:
                step, results = runs.last_evaluation(workdir) if os.path.isdir(workdir) else (0, {})
                why = outcome.left.get(run.name) or (outcome.done.get(run.name) or {}).get("failed", "not run")
                out[run.name] = {"name": run.name, "step": step, "total_steps": run.config().train.total_steps,
                                 "results": results, "command": run.command(workdir), "code": PREEMPTED_EXIT,
                                 "stopped": True, "left": why, "checkpoint_step": checkpoint_step(workdir),
                                 "log": f"logs/{run.name}.log", "seconds": 0}
        out["_concurrency"] = {"concurrent": outcome.concurrency, "mps": outcome.mps}
        return out

    # -----------------------------------------------------------------------------------
    # The plan and the loop.

    def tasks(self, parts: Sequence[str], torch_gpu: bool | None) -> list[Task]:
        tasks = []
        benches = self.benches()
        quick = 3.0 if self.tiny else None
        if "calibrate" in parts:
            tasks.append(Task("calibrate", "calibrate", quick or 60, lambda t, d: self.calibrate(d)))
        if "bench" in parts:
            for b in benches:
                tasks.append(Task(f"bench/{b.key}/resnet_jax", "bench", quick or (60 if b.image_size > 32 else 40),
                                  lambda t, d, b=b: self.bench_ours(b, d, t.key)))
                tasks.append(Task(f"bench/{b.key}/flax_reference", "bench", quick or 40,
                                  lambda t, d, b=b: self.bench_reference(b, "jax", d, t.key)))
            if torch_gpu and self.torch:
                for b in benches:
                    tasks.append(Task(f"bench/{b.key}/torch", "bench", quick or 40,
                                      lambda t, d, b=b: self.bench_reference(b, "torch", d, t.key)))
                    if b.model == "resnet50":
                        tasks.append(Task(f"bench/{b.key}/torch_compile", "bench", quick or 150,
                                          lambda t, d, b=b: self.bench_reference(b, "torch_compile", d, t.key)))
        if "e2e" in parts:
            for n in self.dispatch_values():
                tasks.append(Task(f"e2e/spd{n}", "e2e", quick or 90, lambda t, d, n=n: self.e2e(n, d, t.key),
                                  training=True))
        if "degradation" in parts:
            for run in self.degradation_runs():
                workdir = os.path.join(self.out, "degradation", run.name)
                tasks.append(Task(f"degradation/{run.name}", "degradation", quick or 60,
                                  lambda t, d, run=run, w=workdir: self.train_run(run, w, t.key, d), training=True))
        return tasks

    def calibrate(self, deadline: float) -> dict:
        start = time.time()
        result = calibration_lib.calibrate(self.out, self.tiny, deadline,
                                           log=lambda line: print(f"[calibrate] {line}", flush=True), cwd=ROOT)
        best = runs.Calibration.load(os.path.join(self.out, "calibration.json")).best_concurrency(
            calibration_lib.Sizes.of(self.tiny).models)
        return {"code": 0, "seconds": time.time() - start, "stopped": False, "log": "calibration.json",
                "startup_s": result["startup_s"], "mps_works": result["mps"]["works"],
                "best_concurrency": best[0], "best_with_mps": best[1]}

    def benches(self) -> tuple[Bench, ...]:
        return self.benches_chosen

    def dispatch_values(self) -> list[int]:
        return self.dispatch_chosen

    def is_done(self, task: Task) -> bool:
        record = self.results["tasks"].get(task.key)
        return bool(record) and record.get("code") == 0

    def run(self, parts: Sequence[str]) -> list[str]:
        """Runs what is not done yet in budget; returns the keys left."""
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            machine = self.probe()
            self.machine = machine
            self.results["machine"] = machine
            self.invocation["machine"] = machine
            print(f"device suite: {machine['device_count']} x {machine['device_kind']} ({machine['backend']}), "
                  f"jax {machine['versions'].get('jax')}, flax {machine['versions'].get('flax')}; budget "
                  f"{self.budget_s:.0f} s; out {self.out}", flush=True)
            if not self.tiny and machine["backend"] == "cpu":
                print("note: no accelerator here: the numbers are CPU numbers (use --tiny for a smoke run)", flush=True)
            shown = os.path.relpath(self.reference, ROOT) if self.reference.startswith(ROOT + os.sep) else self.reference
            self.results["reference"] = {"path": shown, "torch_gpu": machine.get("torch_gpu")}
            left = []
            tasks = self.tasks(parts, machine.get("torch_gpu"))
            batch = None  # the degradation runs: trained together, up to --concurrent at once
            for task in tasks:
                if self.is_done(task):
                    continue
                if task.part == "degradation" and batch is not None:
                    self._record(task, batch[task.key.split("/", 1)[1]], left)
                    continue
                if task.part in ("e2e", "degradation") and not self.tiny and not self.data:
                    left.append(task.key)  # no CIFAR-10 here yet
                    self.invocation["not_started"].append(task.key)
                    continue
                remaining = self.deadline - self.margin_s - time.time()
                if self.stop_signal or remaining < task.min_s:
                    left.append(task.key)
                    self.invocation["not_started"].append(task.key)
                    continue
                print(f"[{task.key}] starting ({remaining:.0f} s of budget left)", flush=True)
                if task.part == "degradation":
                    batch = self.degradation([t for t in tasks if t.part == "degradation" and not self.is_done(t)],
                                             self.deadline - self.margin_s)
                    self.results["degradation_sharing"] = batch.pop("_concurrency")
                    self._record(task, batch[task.key.split("/", 1)[1]], left)
                    continue
                self._record(task, task.run(task, self.deadline - self.margin_s), left)
            return left
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _record(self, task: Task, record: dict, left: list[str]) -> None:
        """Keeps `task`'s record, says how it went, saves results.json."""
        record["date"] = self.invocation["date"]
        self.results["tasks"][task.key] = record
        state = ("done" if record.get("code") == 0 else
                 "stopped by the budget" if record.get("stopped") else f"failed (exit {record.get('code')})")
        print(f"[{task.key}] {state} in {record.get('seconds', 0):.1f} s: {brief(record)}; log "
              f"{record.get('log')}", flush=True)
        (self.invocation["finished"] if record.get("code") == 0 else self.invocation["stopped"]).append(task.key)
        if record.get("code") != 0:
            left.append(task.key)
        self.save()

    def save(self) -> None:
        runs.write_json(self.path, self.results)

    def finish(self, parts: Sequence[str], left: list[str]) -> None:
        self.invocation["seconds"] = time.time() - self.start
        self.invocation["parts"] = list(parts)
        self.invocation["left"] = left
        self.results["invocations"].append(self.invocation)
        self.results["tiny"] = self.tiny
        self.results["bench"] = bench_table(self.results["tasks"], TINY_BENCHES if self.tiny else BENCHES)
        self.results["e2e"] = e2e_table(self.results["tasks"], self.results["bench"])
        if "degradation" in parts and (self.tiny or self.data):
            self.results["degradation"] = self.degradation_summary()
        self.results["left"] = left
        self.save()
        write_summary(os.path.join(self.out, "summary.md"), self.results)

    def degradation_summary(self) -> dict | None:
        from . import degradation

        rows = []
        for run in self.degradation_runs():
            record = self.results["tasks"].get(f"degradation/{run.name}")
            workdir = os.path.join(self.out, "degradation", run.name)
            if record and os.path.isdir(workdir):
                rows.append({k: v for k, v in runs.result_row(run, record, workdir).items() if k != "curves"}
                            | {"done": record.get("code") == 0, "checkpoint_step": record.get("checkpoint_step")})
        if not rows:
            return None
        planned = len(self.degradation_runs())
        complete = len(rows) == planned and all(r["done"] for r in rows)
        return {"rows": rows, "findings": degradation.findings(rows, rows[0]["headline_split"]) if complete else []}


def selected_benches(tiny: bool, keys: Sequence[str] | None) -> tuple[Bench, ...]:
    """--bench's configurations (all by default; --tiny: the tiny one)."""
    if tiny:
        return TINY_BENCHES
    if not keys:
        return BENCHES
    known = {b.key: b for b in BENCHES}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise UserError(f"--bench: unknown configuration {unknown[0]!r}; choose from {', '.join(known)}")
    return tuple(known[k] for k in keys)


def dispatch_values(tiny: bool, items: Sequence[str]) -> list[int]:
    """--e2e_dispatch as numbers (0: auto, resolved by the trainer)."""
    if tiny:
        return [1]
    values = []
    for item in items:
        if not item.strip().isdigit():
            raise UserError(f"--e2e_dispatch: {item!r} is not a number of steps (0: auto)")
        values.append(int(item))
    return values


# ---------------------------------------------------------------------------------------
# Tables.


def brief(record: dict) -> str:
    keys = ("images_per_sec", "ms_per_step", "mfu", "compile_s", "wall_images_per_sec", "step")
    parts = [f"{k}={record[k]:.4g}" if isinstance(record.get(k), float) else f"{k}={record[k]}"
             for k in keys if record.get(k) is not None]
    return ", ".join(parts) or "no numbers"


def bench_table(tasks: dict, benches: Sequence[Bench]) -> list[dict]:
    rows = []
    for b in benches:
        ours = tasks.get(f"bench/{b.key}/resnet_jax") or {}
        row = {"model": b.model, "batch": b.batch, "image_size": b.image_size, "dtype": "bfloat16",
               "reference_model": b.ref_model, "resnet_jax": {k: ours.get(k) for k in (
                   "ms_per_step", "images_per_sec", "mfu", "compile_s", "tflops_per_sec", "command")}}
        for ref in ("flax_reference", "torch", "torch_compile"):
            record = tasks.get(f"bench/{b.key}/{ref}")
            if not record:
                continue
            entry = {k: record.get(k) for k in ("ms_per_step", "images_per_sec", "seconds", "command")}
            if ours.get("images_per_sec") and record.get("images_per_sec"):
                entry["ratio"] = ours["images_per_sec"] / record["images_per_sec"]  # > 1: resnet_jax is faster
                if ours.get("mfu"):  # the same model's FLOPs in the reference's time
                    entry["mfu"] = ours["mfu"] * record["images_per_sec"] / ours["images_per_sec"]
            row[ref] = entry
        rows.append(row)
    return rows


def e2e_table(tasks: dict, bench: list[dict]) -> list[dict]:
    synthetic = {(r["model"], r["batch"]): r["resnet_jax"].get("images_per_sec") for r in bench}
    rows = []
    for key, record in sorted(tasks.items()):
        if not key.startswith("e2e/") or record.get("code") != 0 or "wall_images_per_sec" not in record:
            continue
        model = "resnet8" if record["variant"].startswith("resnet8") else "resnet56"
        rate = synthetic.get((model, record["batch"]))
        rows.append({**{k: record.get(k) for k in (
            "variant", "batch", "steps_per_dispatch", "logged_images_per_sec", "wall_images_per_sec",
            "launch_to_first_log_s", "launch_to_first_step_s", "first_log_step", "wall_window_steps", "evaluations",
            "command")},
            "synthetic_images_per_sec": rate,
            "wall_percent_of_synthetic": 100 * record["wall_images_per_sec"] / rate if rate else None,
            "logged_percent_of_synthetic": 100 * record["logged_images_per_sec"] / rate if rate else None})
    return rows


def _num(value, fmt: str = ".0f", missing: str = "not yet measured") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else missing


def write_summary(path: str, results: dict) -> None:
    machine = results.get("machine") or {}
    versions = machine.get("versions", {})
    last = results["invocations"][-1]
    out = ["# Device suite" + (" (--tiny: plumbing check on tiny nets, not a measurement to quote)"
                               if results.get("tiny") else ""), "",
           f"- Card: {machine.get('device_count')} x {machine.get('device_kind')} ({machine.get('backend')}), "
           f"host {machine.get('host')}",
           "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
           f"- Invocations ({len(results['invocations'])}): "
           + "; ".join(f"{i['date']} `{i['command']}` ({i.get('seconds', 0):.0f} s of {i['budget_s']:.0f})"
                       for i in results["invocations"]),
           f"- Reference: `{results.get('reference', {}).get('path')}` run by the suite in the same invocation "
           "(torchvision rows only where torch sees a GPU)", ""]
    out += ["## Synthetic train step (bf16)", "",
            "ms/step: median of 3 rounds of back-to-back steps (reference: the mean over its timed steps). Ratio = "
            "resnet_jax img/s / reference img/s (> 1: resnet_jax faster). Reference MFU uses resnet_jax's FLOP "
            "count of the same net.", "",
            "| model | batch | px | resnet_jax ms/step | img/s | MFU | compile s | Flax ref img/s | ratio | "
            "torch img/s | ratio | torch.compile img/s | ratio |", "|" + "---|" * 13]
    for r in results["bench"]:
        ours = r["resnet_jax"]
        cells = [r["model"], str(r["batch"]), str(r["image_size"]), _num(ours.get("ms_per_step"), ".2f"),
                 _num(ours.get("images_per_sec")), _num(ours.get("mfu"), ".1%", "—"), _num(ours.get("compile_s"), ".1f")]
        for ref in ("flax_reference", "torch", "torch_compile"):
            entry = r.get(ref) or {}
            cells += [_num(entry.get("images_per_sec"), ".0f", "not run" if not entry else "not yet measured"),
                      _num(entry.get("ratio"), ".2f", "—")]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Commands: " + "; ".join(f"`{r['resnet_jax']['command']}`" for r in results["bench"]
                                         if r["resnet_jax"].get("command")), ""]
    out += ["## End to end (resnet56, CIFAR-10 npz, pad-crop-flip, exact eval of test and test_exact every epoch)"
            if not results.get("tiny") else "## End to end (tiny: resnet8, smoke schedule, synthetic)", "",
            "wall img/s: images trained from the end of the first epoch's evaluation to the end of the last one, "
            "over the wall time between them (every epoch's evaluation and checkpoint, host work included); logged: the median rate the run logs (training time only). "
            "% of the synthetic step's rate at the same model and batch. Launch to first step: launch to the first "
            "log record, less the steps before it at the logged rate.", "",
            "| steps/dispatch | wall img/s | % of synthetic | logged img/s | % | launch → first step s | command |",
            "|---|---|---|---|---|---|---|"]
    for r in results["e2e"]:
        out.append(f"| {r['steps_per_dispatch']} | {_num(r['wall_images_per_sec'])} | "
                   f"{_num(r['wall_percent_of_synthetic'], '.0f', '—')} | {_num(r['logged_images_per_sec'])} | "
                   f"{_num(r['logged_percent_of_synthetic'], '.0f', '—')} | {_num(r['launch_to_first_step_s'], '.1f')} "
                   f"| `{r['command']}` |")
    if not results["e2e"]:
        out.append("| not yet measured | | | | | | |")
    degradation = results.get("degradation")
    calibration = (results.get("tasks") or {}).get("calibrate")
    if calibration and calibration.get("code") == 0:
        out += ["## Calibration", "", f"`calibration.json`: start-up {_num(calibration.get('startup_s'), '.1f')} s; "
                f"CUDA MPS works: {calibration.get('mps_works')}; best sharing for the degradation runs: "
                f"{calibration.get('best_concurrency')} at once" + (" under MPS" if calibration.get("best_with_mps")
                                                                    else "") + ".", ""]
    sharing = results.get("degradation_sharing")
    out += ["", "## Degradation (`gpu_paper` schedule of configs/cifar.py)" if not results.get("tiny")
            else "## Degradation (tiny: smoke schedule)", ""]
    if degradation:
        splits = degradation["rows"][0]["eval_splits"]
        out += ["| run | steps | train error % | " + " | ".join(f"{s} error %" for s in splits) + " | min | command |",
                "|" + "---|" * (5 + len(splits))]
        for r in degradation["rows"]:
            cells = [r["name"], f"{r['steps']}/{r['total_steps']}" if r["done"] else
                     f"stopped; checkpoint at step {r['checkpoint_step'] or 0} of {r['total_steps']} (resumes)",
                     runs.pct(r["train_error"])] + [runs.pct(r.get(f"{s}_error")) for s in splits]
            out.append("| " + " | ".join(cells + [f"{r.get('minutes') or 0:.1f}", f"`{r['command']}`"]) + " |")
        out += ["", *(degradation["findings"] or ["- Findings once all four runs have finished."])]
        if sharing:
            out += ["", f"Runs at once: {sharing['concurrent']}" + (" under CUDA MPS." if sharing["mps"] else ".")]
    else:
        out.append("not yet measured")
    left = results.get("left") or []
    asked = last.get("parts") or list(DEFAULT_PARTS)
    others = [p for p in DEFAULT_PARTS if p not in asked]  # calibrate is asked for by name
    done = (f"Nothing of the parts asked ({', '.join(asked)})" + (f"; not asked: {', '.join(others)}" if others else
                                                                 ": every part finished") + ".")
    out += ["", "## Left", "", ("- " + "\n- ".join(left) + f"\n\nRun the same command again to continue: "
                                f"`{last['command']}`") if left else done, ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


# ---------------------------------------------------------------------------------------
# Entry point.


def run(argv: Sequence[str]) -> int:
    if not FLAGS.out:
        raise UserError("--out is required")
    parts = [p.strip() for p in FLAGS.parts if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UserError(f"--parts: unknown part {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(PARTS)}")
    reference = os.path.abspath(os.path.expanduser(FLAGS.reference)) if FLAGS.reference else REFERENCE
    if "bench" in parts and not os.path.isfile(reference):
        raise UserError(f"--reference: file not found: {reference}")
    data = ""
    if not FLAGS.tiny and ({"e2e", "degradation"} & set(parts)):
        data = FLAGS.data and os.path.abspath(os.path.expanduser(FLAGS.data))
        if FLAGS.data and not os.path.isfile(data):
            raise UserError(f"--data: file not found: {data}")
        if not data:  # bench alone still runs
            print("note: no --data=CIFAR10.npz (python -m resnet_jax.data.cifar_npz makes one): e2e and "
                  "degradation are left for later", flush=True)
    # Bad --bench / --e2e_dispatch / --concurrent / calibration.json: before anything runs.
    benches, dispatch = selected_benches(FLAGS.tiny, FLAGS.bench), dispatch_values(FLAGS.tiny, FLAGS.e2e_dispatch)
    concurrent = runs.parse_concurrent(FLAGS.concurrent)
    if FLAGS.calibration:
        runs.Calibration.load(FLAGS.calibration)
    out = os.path.abspath(os.path.expanduser(FLAGS.out))
    # The data path is not part of the identity: the same folder continues on another machine.
    runs.check_experiment(out, {"experiment": "device_suite", "tiny": FLAGS.tiny})
    suite = Suite(out, FLAGS.tiny, FLAGS.budget_s, os.path.abspath(reference) if reference else "", data, argv,
                  benches=benches, dispatch=dispatch, torch=FLAGS.torch, concurrent=concurrent,
                  calibration_path=os.path.abspath(FLAGS.calibration) if FLAGS.calibration else "")
    left = suite.run(parts)
    suite.finish(parts, left)
    print(f"wrote {out}/results.json and {out}/summary.md ({time.time() - suite.start:.0f} s)", flush=True)
    if left:
        print(f"left: {', '.join(left)}; run the same command again to continue", flush=True)
        return PREEMPTED_EXIT
    print("all parts done", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    with cli.errors_exit():
        cli.parse_flags(FLAGS, argv, __doc__)
        code = run(argv)
    sys.exit(code)


def checkpoint_step(workdir: str) -> int | None:
    """The newest saved step in `workdir` (None: none)."""
    return max(records.saved_steps(workdir), default=None)


if __name__ == "__main__":
    main()
