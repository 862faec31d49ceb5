"""The device suite: `--tiny` runs every part on CPU and writes results.json and
summary.md with positive rates; a budget too small for anything stops cleanly (exit 3, what is
left said) and the same command continues; the budget stops a training child with SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT

# A stand-in for experiments/reference.py that prints its RESULT line at once, with a
# known rate, so the ratio can be checked exactly (the real one compiles for many seconds on a CPU).
FAKE_REFERENCE = """import sys
kind, model, batch = sys.argv[1:4]
print(f"RESULT {kind} {model} B={batch} 50 img/s {1e3 * int(batch) / 50:.2f} ms/step")
"""


def _suite(out, *args, timeout=600):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "experiments.device_suite", f"--out={out}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("device_suite")
    reference = base / "reference.py"
    reference.write_text(FAKE_REFERENCE)
    out = base / "ds"
    # First with a budget that fits nothing: exit 3, nothing run, everything left.
    starved = _suite(out, "--tiny", "--budget_s=1", f"--reference={reference}")
    # Then the same command with room: it continues in the same folder.
    full = _suite(out, "--tiny", f"--reference={reference}")
    return out, starved, full


def test_budget_too_small_stops_cleanly_and_says_what_is_left(tiny):
    out, starved, _ = tiny
    assert starved.returncode == 3, starved.stderr[-3000:]
    assert "left: bench/resnet8_b16/resnet_jax, bench/resnet8_b16/flax_reference, e2e/spd1," in starved.stdout
    assert "run the same command again to continue" in starved.stdout
    first = json.loads((out / "results.json").read_text())["invocations"][0]
    assert first["finished"] == [] and len(first["not_started"]) == 5 and first["budget_s"] == 1


def test_tiny_writes_every_part_with_positive_rates(tiny):
    out, _, full = tiny
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert "all parts done" in full.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["invocations"]) == 2 and results["left"] == []
    assert results["machine"]["backend"] == "cpu" and results["machine"]["versions"]["jax"]
    (bench,) = results["bench"]
    ours, reference = bench["resnet_jax"], bench["flax_reference"]
    assert ours["images_per_sec"] > 0 and ours["ms_per_step"] > 0 and ours["compile_s"] > 0
    assert reference["images_per_sec"] == 50 and reference["ratio"] == pytest.approx(ours["images_per_sec"] / 50)
    (e2e,) = results["e2e"]
    assert e2e["wall_images_per_sec"] > 0 and e2e["logged_images_per_sec"] > 0 and e2e["launch_to_first_log_s"] > 0
    assert e2e["evaluations"] == [8, 16] and e2e["steps_per_dispatch"] == 1
    assert not (out / "e2e" / "spd1" / "checkpoints").exists()  # measured: nothing to carry back
    rows = results["degradation"]["rows"]
    assert [r["name"] for r in rows] == ["plain8_seed0", "resnet8_seed0"]
    assert all(r["done"] and r["steps"] == 8 and r["checkpoint_step"] == 8 and 0 <= r["test_error"] <= 1 for r in rows)
    assert all(r["command"].startswith("python -m resnet_jax.main --config=configs/cifar.py:") for r in rows)
    assert results["degradation"]["findings"]  # the plain-vs-ResNet comparison was written
    # keep_checkpoints=1: the latest, plus the best where that is another, so workdirs stay
    # small enough to carry off a device and back.
    for name in ("plain8_seed0", "resnet8_seed0"):
        steps = sorted(int(d) for d in os.listdir(out / "degradation" / name / "checkpoints") if d.isdigit())
        assert steps[-1] == 8 and len(steps) <= 2
    summary = (out / "summary.md").read_text()
    for heading in ("## Synthetic train step", "## End to end", "## Degradation", "## Left"):
        assert heading in summary
    assert "| resnet8 | 16 | 16 |" in summary
    assert "Nothing of the parts asked (bench, e2e, degradation): every part finished." in summary


def test_the_budget_stops_a_training_child_with_sigterm(tmp_path):
    """A child that checkpoints on SIGTERM (as resnet_jax.main does) gets it `grace_s` before
    the deadline and its exit 3 is reported as stopped; one that ignores it is killed."""
    from experiments import device_suite

    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print("checkpoint written", flush=True), sys.exit(3)))
        time.sleep(60)
    """))
    suite = device_suite.Suite(str(tmp_path), tiny=True, budget_s=60, reference="", data="", argv=["x"])
    start = time.time()
    record = suite.spawn([sys.executable, str(child)], "training", start + suite.grace_s + 1.5, training=True)
    assert record["code"] == 3 and record["stopped"] and record["seconds"] < 10
    assert "checkpoint written" in (tmp_path / record["log"]).read_text()
    # SIGTERM to the suite itself: the child gets exactly one (a second makes resnet_jax.main
    # exit without its checkpoint), and it is reported as stopped.
    counting = tmp_path / "counting.py"
    counting.write_text(textwrap.dedent("""
        import signal, sys, time
        seen = []
        def handle(*_):
            seen.append(1)
            print(f"SIGTERM {len(seen)}", flush=True)
        signal.signal(signal.SIGTERM, handle)
        while not seen:
            time.sleep(0.01)
        time.sleep(0.5)  # writing the checkpoint
        sys.exit(3)
    """))
    import threading

    threading.Timer(1.0, suite._forward, (signal.SIGTERM, None)).start()
    record = suite.spawn([sys.executable, str(counting)], "suite_stopped", time.time() + 60, training=True)
    log = (tmp_path / record["log"]).read_text()
    assert record["code"] == 3 and record["stopped"] and "SIGTERM 1" in log and "SIGTERM 2" not in log
    suite.stop_signal = None
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n")
    record = suite.spawn([sys.executable, str(stubborn)], "bench", time.time() + 1.0)
    assert record["code"] == -signal.SIGKILL and record["stopped"] and record["seconds"] < 10


def test_bad_parts_is_one_line_exit_2(tmp_path):
    result = _suite(tmp_path / "ds", "--parts=bench,speed", timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --parts: unknown part 'speed'; choose from calibrate, bench, e2e, degradation")
