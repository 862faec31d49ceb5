"""Driving it from a terminal and from a log: --help, config names from any
directory, the `resnet-jax` console script, and progress lines a log file can hold."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from helpers import cli_args
from resnet_jax import cli, reporting

RESNET_JAX = os.path.join(os.path.dirname(sys.executable), "resnet-jax")  # the console script


def _outside_env() -> dict:
    """The environment of a user outside the repository: only the installed package."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.parametrize("module,names", [
    ("resnet_jax.main", ("--config", "--workdir", "--distributed", "python -m resnet_jax.main --config=cifar:")),
    ("resnet_jax.evaluate", ("--workdir", "--split", "--checkpoint", "python -m resnet_jax.evaluate")),
    ("experiments.degradation", ("--workdir", "--depths", "--schedule", "python -m experiments.degradation")),
    ("experiments.skip_ablation", ("--workdir", "--study", "--bn_devices", "python -m experiments.skip_ablation")),
    ("experiments.benchmark", ("--model", "--batch", "python -m experiments.benchmark")),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_says_what_it_does_and_exits_0(module, names, flag, capsys):
    program = __import__(module, fromlist=["main"])
    with pytest.raises(SystemExit) as exit_info:
        program.main([module, "--workdir=/x", flag])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(program.__doc__.strip().splitlines()[0]) and "\nflags:\n" in out
    for name in names:
        assert name in out, name
    assert "--flagfile" not in out and not re.search(r"^\S+\.py:$", out, re.M)  # no absl flags, no module headings


def test_helpfull_adds_absl_flags(capsys):
    from experiments import degradation

    with pytest.raises(SystemExit) as exit_info:
        degradation.main(["degradation", "--helpfull"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--flagfile" in out


def test_console_script():
    def run(*args):
        return subprocess.run([RESNET_JAX, *args], capture_output=True, text=True, timeout=120, env=_outside_env())

    alone = run()
    assert alone.returncode == 0 and alone.stderr == ""
    assert re.findall(r"^  (\w+) ", alone.stdout, re.M)[:3] == ["train", "evaluate", "configs"]
    helped = run("--help")
    assert helped.returncode == 0 and "--config" in helped.stdout and "--workdir" in helped.stdout
    listed = run("configs")
    assert listed.returncode == 0
    for text in ("cifar: He et al. 2015", "digits: Offline quick start", "imagenet: ResNets on ImageNet",
                 "python -m resnet_jax.main --config=cifar:resnet56", "cosine"):
        assert text in listed.stdout, text
    assert re.search(r"^    short +the recipe's shape in 480 steps", listed.stdout, re.M)
    wrong = run("fit")
    assert wrong.returncode == 2
    assert re.fullmatch(r"error: unknown command 'fit'; use train, evaluate, configs, convert, benchmark, "
                        r"degradation, .*, skip_ablation\n", wrong.stderr)


def test_config_names_resolve_from_any_directory(tmp_path):
    probe = ("from resnet_jax import cli\n"
             "for spec in ('cifar:resnet8,smoke', 'configs/cifar.py:plain14', 'digits', 'imagenet:resnet50'):\n"
             "    c = cli.config_from_args(['--config=' + spec, '--config.train.seed=3'])\n"
             "    print(spec, c.model.name, c.data.name, c.train.batch_size, c.train.seed)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_outside_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["cifar:resnet8,smoke resnet8 cifar10 16 3",
                                          "configs/cifar.py:plain14 plain14 cifar10 128 3",
                                          "digits resnet8 digits 64 3",
                                          "imagenet:resnet50 resnet50 imagenet2012 256 3"]
    assert cli.resolve_config("cifar:resnet8") == os.path.join(cli.config_dir(), "cifar.py") + ":resnet8"
    with pytest.raises(cli.UserError, match="No such file or directory: 'nosuch'.*recipe name: cifar, digits, imagenet"):
        cli.resolve_config("nosuch:resnet8")
    assert cli.resolve_config_args(["p", "--config", "digits", "--config.x=1", "--", "--config=cifar"]) == [
        "p", "--config", os.path.join(cli.config_dir(), "digits.py"), "--config.x=1", "--", "--config=cifar"]


def test_a_logged_run_is_plain_lines(tmp_path):
    """The digits quick start with stdout in a file, from outside the repository: one line per
    log window and per evaluation, their numbers those of metrics.jsonl, no carriage return."""
    workdir = tmp_path / "run"
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        code = subprocess.call([RESNET_JAX, "train", "--config=digits", f"--workdir={workdir}",
                                *cli_args({"train.progress": True})],
                               cwd=tmp_path, env=_outside_env(), stdout=out, stderr=err, timeout=600)
    stdout, stderr = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert code == 0, stdout + stderr
    assert "\r" not in stdout and "\r" not in stderr
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "test"]
    step_lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [r["step"] for r in train] == [5, 10, 15, 20] and len(step_lines) == 4, stdout
    for line, record in zip(step_lines, train):
        eta = r"  ETA \d+ (s|min|h)" if record["step"] < 20 else ""
        assert re.fullmatch(rf"step {record['step']}/20 \({5 * record['step']} %\)  loss {record['loss']:.3f}  "
                            rf"train err {100 * record['error']:.1f} %  lr {record['lr']:.3g}  [\d,]+ img/s{eta}",
                            line), line
    eval_lines = [line for line in stdout.splitlines() if line.startswith("eval step ")]
    assert [r["step"] for r in evals] == [10, 20] and len(eval_lines) == 2, stdout
    best = min(evals, key=lambda r: (r["error"], r["step"]))
    for line, record in zip(eval_lines, evals):
        best_so_far = min((r for r in evals if r["step"] <= record["step"]), key=lambda r: (r["error"], r["step"]))
        assert line == (f"eval step {record['step']}: test err {100 * record['error']:.2f} % "
                        f"(top-5 {100 * record['top5_error']:.2f} %), best {100 * best_so_far['error']:.2f} % "
                        f"@ {best_so_far['step']}")
        assert record["examples"] == 120
    assert best["error"] < 0.9  # it learned something in 20 steps
    assert (f"writing to {workdir} (metrics.jsonl, tensorboard/), checkpoints in {workdir}/checkpoints; "
            f"watch with: tensorboard --logdir {workdir}") in stdout.splitlines()


def test_reporter_lines(tmp_path, capsys, monkeypatch):
    reporter = reporting.Reporter(str(tmp_path), total_steps=64_000, start_step=0)
    reporter.start_time = time.time() - 100  # 12,800 steps in 100 s: 400 s to go
    reporter.advance_to(12_800)
    reporter.write({"step": 12_800, "split": "train", "loss": 0.5321, "error": 0.1824, "lr": 0.1, "grad_norm": 2.0,
                    "images_per_sec": 3410.4})
    reporter.evaluated(12_800, {"test": {"loss": 0.3, "error": 0.0981, "top5_error": 0.0042, "examples": 10_000}},
                       12_800, 0.0981, "test")
    reporter.evaluated(16_000, {"test": {"loss": 0.3, "error": 0.1, "top5_error": 0.005, "examples": 10_000},
                                "test_exact": {"loss": 0.3, "error": 0.095, "top5_error": 0.004, "examples": 1000}},
                       12_800, 0.0981, "test")
    reporter.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 12,800/64,000 (20 %)  loss 0.532  train err 18.2 %  lr 0.1  3,410 img/s  ETA 7 min",
        "eval step 12,800: test err 9.81 % (top-5 0.42 %), best 9.81 % @ 12,800",
        "eval step 16,000: test err 10.00 % (top-5 0.50 %), test_exact err 9.50 % (top-5 0.40 %), "
        "best test 9.81 % @ 12,800"]
    records = reporting.read_metrics(str(tmp_path))
    assert [(r["step"], r["split"]) for r in records] == [(12_800, "train"), (12_800, "test"), (16_000, "test"),
                                                          (16_000, "test_exact")]
    assert records[1] == {"step": 12_800, "split": "test", "loss": 0.3, "error": 0.0981, "top5_error": 0.0042,
                          "examples": 10_000}


def test_reporter_on_a_terminal_keeps_the_bar_and_prints_evaluations(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reporting, "on_terminal", lambda: True)
    reporter = reporting.Reporter(str(tmp_path), total_steps=100, start_step=0)
    reporter.advance_to(50)
    reporter.write({"step": 50, "split": "train", "loss": 1.0, "error": 0.5, "lr": 0.1, "images_per_sec": 10.0})
    reporter.evaluated(50, {"test": {"loss": 1.0, "error": 0.25, "top5_error": 0.0, "examples": 8}}, 50, 0.25, "test")
    reporter.close()
    captured = capsys.readouterr()
    assert captured.out == "eval step 50: test err 25.00 % (top-5 0.00 %), best 25.00 % @ 50\n"  # no plain step line
    assert "50/100" in captured.err  # the bar


def test_only_process_0_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reporting.jax, "process_index", lambda: 1)
    reporter = reporting.Reporter(str(tmp_path), total_steps=10, start_step=0)
    reporter.started(str(tmp_path), str(tmp_path / "checkpoints"))
    reporter.write({"step": 5, "split": "train", "loss": 1.0, "error": 0.5})
    reporter.evaluated(5, {"test": {"loss": 1.0, "error": 0.5, "top5_error": 0.1, "examples": 8}}, 5, 0.5, "test")
    reporter.close()
    assert capsys.readouterr() == ("", "") and not os.listdir(tmp_path)
