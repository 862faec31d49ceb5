"""Several runs on one machine: K at once, CUDA MPS, the budget planner, records that outlive
the workdirs, and the calibration they are planned from."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments.runs import gpu_share, planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = ["--schedule=smoke", "--depths=8"]
# Records every call: its arguments, what it read on stdin (the quit), where its pipes are.
MPS_STUB = """#!/bin/sh
if [ "$#" -eq 0 ]; then input=$(cat); else input=""; fi
echo "args=[$*] stdin=[$input] pipe=[$CUDA_MPS_PIPE_DIRECTORY] logs=[$CUDA_MPS_LOG_DIRECTORY]" >> "$MPS_STUB_LOG"
"""


def _degradation(workdir, *args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.degradation", f"--workdir={workdir}", *STUDY, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _stub_env(folder):
    """PATH with a stand-in nvidia-cuda-mps-control first; its calls go to folder/mps.log."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    stub = bin_dir / gpu_share.MPS_CONTROL
    stub.write_text(MPS_STUB)
    stub.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", MPS_STUB_LOG=str(folder / "mps.log"))


def _mps_calls(folder):
    return (folder / "mps.log").read_text().splitlines()


def _lifetime(log_path):
    """(start, exit) wall times a supervised child's log records."""
    text = open(log_path).read()
    start = float(re.search(r"^# start ([\d.]+) ", text, re.M).group(1))
    end = float(re.search(r"^# exit 0 at ([\d.]+) ", text, re.M).group(1))
    return start, end


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """The smoke study (plain-8, ResNet-8) twice: one run after another in one process; and 2
    at once under a stub MPS, with its records copied out (its children find the programs
    compiled for the first in the compilation cache they share)."""
    base = tmp_path_factory.mktemp("sharing")
    records = base / "records"
    records.mkdir()
    alone = _degradation(base / "alone")
    together = _degradation(base / "together", "--concurrent=2", f"--records={records}", env=_stub_env(base))
    return base, together, alone


def test_two_at_once_overlap_and_match_one_at_a_time(studies):
    base, together, alone = studies
    assert together.returncode == 0, together.stdout[-3000:] + together.stderr[-3000:]
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    assert "up to 2 at once" in together.stdout
    (a0, a1), (b0, b1) = (_lifetime(base / "together" / "logs" / f"{name}.log") for name in ("plain8_seed0",
                                                                                             "resnet8_seed0"))
    assert a0 < b1 and b0 < a1, "the two runs' lifetimes do not overlap"
    for name in ("plain8_seed0", "resnet8_seed0"):
        shared = json.loads((base / "together" / name / "done.json").read_text())
        serial = json.loads((base / "alone" / name / "done.json").read_text())
        assert shared["step"] == serial["step"] == 8
        assert shared["results"] == serial["results"] and shared["best"] == serial["best"]
    rows = {r["name"]: r for r in json.loads((base / "together" / "results.json").read_text())}
    serial_rows = {r["name"]: r for r in json.loads((base / "alone" / "results.json").read_text())}
    for name, row in rows.items():
        assert row["train_error"] == serial_rows[name]["train_error"]
        assert row["test_error"] == serial_rows[name]["test_error"]


def test_mps_daemon_started_and_quit_once_in_a_temporary_folder(studies):
    base, together, _ = studies
    calls = _mps_calls(base)
    assert len(calls) == 2, calls
    start, quit_ = calls
    assert start.startswith("args=[-d] stdin=[]") and quit_.startswith("args=[] stdin=[quit]")
    pipe = re.search(r"pipe=\[(.*?)\]", start).group(1)
    assert pipe and pipe == re.search(r"pipe=\[(.*?)\]", quit_).group(1) and not os.path.exists(pipe)
    assert "CUDA MPS daemon started" in together.stdout and "CUDA MPS daemon stopped" in together.stdout


def test_records_have_no_checkpoints_and_say_what_and_where(studies):
    base, _, _ = studies
    for name in ("plain8_seed0", "resnet8_seed0"):
        folder = base / "records" / name
        assert sorted(os.listdir(folder)) == ["config.json", "done.json", "metrics.jsonl"]
        done = json.loads((folder / "done.json").read_text())
        assert done["step"] == done["total_steps"] == 8 and done["seconds"] > 0
        assert set(done["results"]) == set(done["best"]) == {"test"}
        assert done["best"]["test"]["error"] <= done["results"]["test"]["error"]
        assert "(cpu)" in done["card"] and done["versions"]["jax"]
        assert done["command"].startswith("python -m resnet_jax.main --config=configs/cifar.py:")


def test_a_study_rebuilt_from_records_alone_is_the_same(studies):
    base, _, _ = studies
    workdir = base / "together"
    table, results = (workdir / "table.md").read_text(), (workdir / "results.json").read_text()
    for name in ("plain8_seed0", "resnet8_seed0"):
        for extra in os.listdir(workdir / name):
            if extra not in ("config.json", "done.json", "metrics.jsonl"):
                shutil.rmtree(workdir / name / extra) if (workdir / name / extra).is_dir() else os.remove(
                    workdir / name / extra)
    rebuilt = _degradation(workdir, f"--records={base / 'records'}")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "training:" not in rebuilt.stdout and rebuilt.stdout.count("finished earlier") == 2
    assert (workdir / "table.md").read_text() == table
    assert (workdir / "results.json").read_text() == results


def test_records_of_two_invocations_merge(studies, tmp_path):
    base, _, _ = studies
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(base / "records" / "plain8_seed0", first / "plain8_seed0")  # from the 2-at-once invocation
    (second / "resnet8_seed0").mkdir(parents=True)
    for name in ("config.json", "done.json", "metrics.jsonl"):  # from the one-at-a-time invocation
        shutil.copy(base / "alone" / "resnet8_seed0" / name, second / "resnet8_seed0" / name)
    merged = _degradation(tmp_path / "merged", f"--records={first},{second}")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "training:" not in merged.stdout
    rows = {r["name"]: r for r in json.loads((tmp_path / "merged" / "results.json").read_text())}
    assert set(rows) == {"plain8_seed0", "resnet8_seed0"}
    for name, invocation in (("plain8_seed0", "together"), ("resnet8_seed0", "alone")):
        (original,) = [r for r in json.loads((base / invocation / "results.json").read_text()) if r["name"] == name]
        for key in ("train_error", "test_error", "test_best_error", "steps", "command", "finished"):
            assert rows[name][key] == original[key], (name, key)
    assert rows["plain8_seed0"]["workdir"] == str(first / "plain8_seed0")
    table = (tmp_path / "merged" / "table.md").read_text()
    assert "| plain-8 | 8 | 1 | 8 |" in table and "| ResNet-8 | 8 | 1 | 8 |" in table and "At depth 8" in table


def test_sigterm_to_the_experiment_still_quits_mps_once(tmp_path):
    env = _stub_env(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "experiments.degradation", f"--workdir={tmp_path / 'w'}",
                                *STUDY, "--concurrent=2"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    child_log = tmp_path / "w" / "logs" / "resnet8_seed0.log"
    deadline = time.time() + 120
    while not child_log.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert child_log.exists(), process.communicate(timeout=60)[0]
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 3, output
    calls = _mps_calls(tmp_path)
    assert [c.split(" pipe=")[0] for c in calls] == ["args=[-d] stdin=[]", "args=[] stdin=[quit]"], (calls, output)


def test_without_mps_control_it_falls_back_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    lines = []
    with gpu_share.mps(lines.append) as env:
        assert env == {}
    assert lines == [f"no {gpu_share.MPS_CONTROL} on PATH: concurrent runs time-share the accelerator without MPS"]


def _calibration(tmp_path, **extra):
    """A made-up calibration: resnet20 4 ms a step alone, 6 ms with 2 at once; resnet56 10 / 14."""
    data = {"startup_s": 10.0, "overhead_s": {"resnet20": 20.0, "resnet56": 30.0}, "mps": {"works": False},
            "concurrency": [{"k": 1, "mps": False, "ms_per_step": {"resnet20": 4.0, "resnet56": 10.0}},
                            {"k": 2, "mps": False, "ms_per_step": {"resnet20": 6.0, "resnet56": 14.0}}], **extra}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    return planner.Calibration.load(str(path))


def test_planner_starts_only_whole_runs_that_fit(tmp_path):
    calibration = _calibration(tmp_path)
    # resnet56, 10k steps alone: 10 ms x 10k = 100 s + 10 s start-up + 30 s overhead = 140 s.
    assert calibration.run_s("resnet56", 10_000, 1) == pytest.approx(140.0)
    assert calibration.run_s("plain56", 10_000, 2) == pytest.approx(180.0)  # a plain net costs its depth's
    assert calibration.run_s("resnet38", 10_000, 1) == pytest.approx(7 * 10 + 10 + 25)  # between 20 and 56
    (fits,) = planner.plan([("r56", "resnet56", 10_000)], calibration, budget_s=140.0, concurrency=1)
    assert fits.start and fits.predicted_s == pytest.approx(140.0)
    (refused,) = planner.plan([("r56", "resnet56", 10_000)], calibration, budget_s=139.0, concurrency=1)
    assert not refused.start
    # Two slots: both 180 s runs start at 0 s; the third would end at 360 s > 300 s; a short
    # resnet20 after it still fits (1k x 6 ms + 10 s + 20 s = 36 s, from 180 s).
    planned = planner.plan([("a", "resnet56", 10_000), ("b", "plain56", 10_000), ("c", "resnet56", 10_000),
                            ("d", "resnet20", 1_000)], calibration, budget_s=300.0, concurrency=2)
    assert [p.start for p in planned] == [True, True, False, True]
    assert planned[3].begin_s == pytest.approx(180.0)
    # auto: 2 at once does (6 + 14) / 2 / 2 = 5 ms of wall time per step of work, alone 7.
    assert calibration.best_concurrency(["resnet20", "resnet56"]) == (2, False)


def test_a_run_the_budget_cannot_hold_is_left_and_said_so(tmp_path):
    calibration = tmp_path / "calibration.json"
    _calibration(tmp_path)  # smoke runs: 8 steps; start-up 10 s + overhead 20 s > a 5 s budget
    result = _degradation(tmp_path / "w", f"--calibration={calibration}", "--budget_s=5", timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "plain8_seed0: not started: predicted" in result.stdout and "left for the next invocation" in result.stdout
    assert not (tmp_path / "w" / "plain8_seed0").exists()


@pytest.mark.parametrize("flag, expected", [
    ("--concurrent=0", "error: --concurrent: '0' is neither a number of runs >= 1 nor 'auto'"),
    ("--concurrent=auto", "error: --concurrent=auto needs --calibration=calibration.json"),
    ("--records=/no/such/folder", "error: --records: no such folder: /no/such/folder"),
    ("--calibration={bad}", "error: --calibration: {bad} is malformed"),
    ("--budget_s=60", "error: --budget_s needs --calibration=calibration.json"),
])
def test_bad_sharing_flags_are_one_line_and_exit_2(tmp_path, flag, expected):
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"concurrency": [{"k": 1, "mps": False, "ms_per_step": {"resnet20": "fast"}}]}))
    result = _degradation(tmp_path / "w", flag.format(bad=bad), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(expected.format(bad=bad)) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "w" / "plain8_seed0").exists()


def test_calibrate_tiny_writes_calibration_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.device_suite", f"--out={tmp_path / 'ds'}",
                             "--parts=calibrate", "--tiny"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "ds" / "calibration.json").read_text())
    assert data["machine"]["backend"] == "cpu" and data["versions"]["jax"] and data["tiny"]
    assert data["mps"]["available"] is (shutil.which(gpu_share.MPS_CONTROL) is not None)
    assert sorted(r["steps_per_dispatch"] for r in data["dispatch"]) == [1, 2]
    assert {(r["k"], r["mps"]) for r in data["concurrency"]} >= {(1, False), (2, False)}
    assert all(ms > 0 for r in data["concurrency"] for ms in r["ms_per_step"].values())
    assert data["startup_s"] > 0 and data["overhead_s"]["resnet8"] >= 0
    calibration = planner.Calibration.load(str(tmp_path / "ds" / "calibration.json"))
    assert calibration.run_s("resnet8", 100, 2) > calibration.startup_s
    summary = (tmp_path / "ds" / "summary.md").read_text()
    assert "## Calibration" in summary


def test_the_gpu_plan_copies_tables_and_records_out_even_when_runs_are_left(tmp_path):
    """scripts/gpu/plan.sh train with one run recorded by an earlier session and a budget
    that holds no other: the study is built from the record, the rest is left (exit 3), and
    the tables still reach DEST."""
    earlier = tmp_path / "earlier" / "plain20_seed0"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text("{}")
    lines = [{"step": s, "split": "train", "error": 0.05, "loss": 0.2} for s in range(57_800, 64_001, 200)]
    lines += [{"step": s, "split": "test_exact", "error": 0.1 - s / 1e6, "loss": 0.4, "examples": 1000}
              for s in (62_000, 63_000, 64_000)]
    (earlier / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (earlier / "done.json").write_text(json.dumps({
        "name": "plain20_seed0", "step": 64_000, "total_steps": 64_000, "minutes": 5.0,
        "results": {"test_exact": lines[-1]}, "best": {"test_exact": {"error": lines[-1]["error"], "step": 64_000}},
        "finished": "2026-01-01T00:00:00", "card": "1 x Some GPU (gpu)", "versions": {"jax": "0"},
        "command": "python -m resnet_jax.main --config=configs/cifar.py:plain20,gpu_paper,npz"}))
    npz = tmp_path / "cifar10.npz"
    npz.write_bytes(b"")  # never read: no run starts
    _calibration(tmp_path)
    dest = tmp_path / "dest"
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu", "plan.sh"), "train", str(dest), str(npz),
                             "5", str(tmp_path / "calibration.json"), str(tmp_path / "earlier")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"plan.sh train: exit 3; results in {dest}" in result.stdout
    assert "resnet20_seed0: not started: predicted" in result.stdout
    table = (dest / "table.md").read_text()
    assert "| plain-20 | 20 | 1 | 64000 | 5.00 | 3.60 | — | 3.60 |" in table and "## Not yet run" in table
    assert "1 x Some GPU (gpu)" in table
    assert [r["name"] for r in json.loads((dest / "results.json").read_text())] == ["plain20_seed0"]
    assert (dest / "fig6.png").exists() and (dest / "records").is_dir()
