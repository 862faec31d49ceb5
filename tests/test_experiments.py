"""experiments/: the degradation pipeline end to end, resuming it, the gradient-flow probe, bad flags.

The degradation test runs the real command (`--schedule=smoke --depths=8`: plain-8 and
ResNet-8, 8 steps each on random 16x16 images) in a subprocess, stops it with SIGTERM as
soon as the first run has finished, runs it again, and checks from the files alone that the
finished run was not touched while the second one was completed and reported. About a
minute on a 2-core CPU. The other tests check the plans (configs/cifar.py variants and the
commands printed for them), one run on simulated devices through its command in a
subprocess, and the gradient-flow probe against direct gradients.
"""

import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from configs import cifar
from experiments import degradation, plots, runs, skip_ablation
from resnet_jax import cli, models, rundir
from resnet_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"experiments.{module}", *args]


def _snapshot(folder) -> dict[str, tuple[int, str]]:
    """relative path -> (mtime_ns, sha256) of every file under `folder`."""
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def _assert_png(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01, "blank image"
    return image


def test_degradation_smoke_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "degradation"
    command = _command("degradation", f"--workdir={workdir}", "--schedule=smoke", "--depths=8")
    first_done = workdir / "plain8_seed0" / "done.json"

    # Stop the experiment once its first run (plain8_seed0) is finished.
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not first_done.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first_done.exists(), process.communicate(timeout=60)[0] if process.poll() is not None else "timed out"
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0, f"the experiment finished before it could be stopped:\n{output}"
    assert not (workdir / "resnet8_seed0" / "done.json").exists()
    assert not (workdir / "results.json").exists()
    before = _snapshot(workdir / "plain8_seed0")
    assert {"done.json", "metrics.jsonl", "config.json"} <= set(before)
    assert any(path.startswith("checkpoints") for path in before)

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "[1/2] plain8_seed0: finished earlier (step 8), skipping" in rerun.stdout
    assert "plain8 on cifar10" not in rerun.stdout  # train_and_evaluate never started for it
    assert "resnet8 on cifar10" in rerun.stdout
    # The run's command is printed as it starts. Whether the SIGTERM caught resnet8 before or
    # after its first checkpoint depends on timing: it trains afresh or resumes.
    command_line = (f"python -m resnet_jax.main --config=configs/cifar.py:resnet8,smoke "
                    f"--workdir={workdir / 'resnet8_seed0'}")
    assert (f"[2/2] resnet8_seed0: training: {command_line}" in rerun.stdout
            or f"[2/2] resnet8_seed0: resuming: {command_line}" in rerun.stdout), rerun.stdout
    assert _snapshot(workdir / "plain8_seed0") == before

    rows = json.loads((workdir / "results.json").read_text())
    assert sorted((r["type"], r["depth"], r["seed"]) for r in rows) == [("plain", 8, 0), ("resnet", 8, 0)]
    table = (workdir / "table.md").read_text()
    for row in rows:
        assert row["steps"] == row["total_steps"] == 8
        assert 0 <= row["train_error"] <= 1 and 0 <= row["test_error"] <= 1
        assert row["test_examples"] == 128  # the smoke schedule's synthetic images, each evaluated once
        assert os.path.isdir(row["workdir"]) and row["workdir"].endswith(f"{row['type']}8_seed0")
        # The final test error is the last evaluation in the run's metrics.jsonl.
        records = [json.loads(line) for line in open(os.path.join(row["workdir"], "metrics.jsonl"))]
        last_eval = [r for r in records if r["split"] == "test"][-1]
        assert last_eval["step"] == 8 and last_eval["error"] == pytest.approx(row["test_error"])
        # Its printed command builds exactly the config the run trained (config.json).
        assert f"`{row['command']}`" in table
        args = shlex.split(row["command"])
        assert args[:3] == ["python", "-m", "resnet_jax.main"]
        trained = json.loads(open(os.path.join(row["workdir"], "config.json")).read())
        assert json.loads(json.dumps(rundir.flatten(cli.config_from_args(args[3:])))) == trained

    _assert_png(workdir / "fig6.png")
    for text in ("| plain-8 | 8 | 1 | 8 |", "| ResNet-8 | 8 | 1 | 8 |", "`plain8,smoke`", "`smoke`", "--depths=8",
                 "At depth 8"):
        assert text in table


def test_bad_flags_are_one_line_and_exit_2(tmp_path):
    for command, expected in (
        (_command("degradation", f"--workdir={tmp_path}", "--depths=20,21"), "error: --depths: '21' is not a CIFAR depth"),
        (_command("degradation", f"--workdir={tmp_path}", "--family=preact", "--depths=164,1000"),
         "error: --depths: '1000' is not a pre-activation CIFAR depth: 6n+2 (8, 14, 20, ..., 110) or a bottleneck"),
        (_command("degradation", f"--workdir={tmp_path}", "--schedule=fast"),
         "error: bad flags: flag --schedule=fast: value should be one of <paper|gpu_paper|gpu|short|smoke>"),
        (_command("degradation", f"--workdir={tmp_path}", "--data=npz:/no/such.npz"), "error: --data: file not found"),
        (_command("degradation", "--depths=20"), "error: --workdir is required"),
        (_command("skip_ablation", f"--workdir={tmp_path}", "--study=shortcut,dropout"), "error: --study: unknown dropout"),
        (_command("skip_ablation", f"--workdir={tmp_path}", "--seeds=0"), "error: bad flags: flag --seeds=0: 0 is not"),
    ):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""
    assert not any(tmp_path.iterdir())  # nothing written


def test_runs_are_config_variants():
    """Each planned run is one configs/cifar.py variant plus overrides; its config is the recipe's.
    Seed-major: every net of seed 0 comes before any of seed 1 (a budget leaves whole seeds)."""
    planned = degradation.plan("short", [20, 56], seeds=2, data="synthetic")
    assert [r.name for r in planned] == ["plain20_seed0", "resnet20_seed0", "plain56_seed0", "resnet56_seed0",
                                         "plain20_seed1", "resnet20_seed1", "plain56_seed1", "resnet56_seed1"]
    assert [(r.variant, dict(r.overrides)) for r in planned[:2] + planned[4:5]] == [
        ("plain20,short,synthetic", {}), ("resnet20,short,synthetic", {}), ("plain20,short,synthetic", {"train.seed": 1})]
    run = planned[4]
    assert run.command("/w") == ("python -m resnet_jax.main --config=configs/cifar.py:plain20,short,synthetic "
                                 "--config.train.seed=1 --workdir=/w")
    config = run.config()
    assert (config.train.total_steps, config.train.batch_size, config.optim.lr, config.train.seed) == (480, 32, 0.025, 1)
    assert (config.data.source, config.model.name, config.model.family) == ("synthetic", "plain20", "cifar")
    # ResNet-110's 400-of-64k-step warm-up keeps its proportion (and stays below total_steps).
    deep = cifar.get_config("resnet110,short")
    assert deep.optim.warmup_steps == 3 and deep.optim.warmup_lr == pytest.approx(0.0025)
    gpu = cifar.get_config("plain56,gpu,npz")
    assert (gpu.train.total_steps, gpu.train.batch_size, gpu.optim.lr, gpu.train.eval_every,
            gpu.train.keep_checkpoints, gpu.data.eval_splits) == (16_000, 128, 0.1, 2000, 1, "test=test,test_exact=test_exact?")
    assert tuple(gpu.optim.boundaries) == (0.5, 0.75) and gpu.optim.momentum == 0.9 and gpu.optim.weight_decay == 1e-4
    # The paper's recipe on a GPU: bf16 compute, test_exact every 1,000 steps, one checkpoint at
    # the end, every period a multiple of the steps scanned per dispatch.
    paper = cifar.get_config("plain56,gpu_paper,npz")
    train = paper.train
    assert (train.total_steps, train.batch_size, paper.optim.lr, paper.model.dtype) == (64_000, 128, 0.1, "bfloat16")
    assert (train.eval_every, train.checkpoint_every, train.keep_checkpoints) == (1000, 64_000, 1)
    assert paper.data.eval_splits == "test_exact=test_exact?,test=test" and cifar.get_config("resnet20").model.dtype == "float32"
    assert train.steps_per_dispatch == 8 and all(
        period % train.steps_per_dispatch == 0 for period in (train.log_every, train.eval_every, train.checkpoint_every))
    for bad in ("resnet20,fast", "resnet20,short,smoke"):
        with pytest.raises(ValueError):
            cifar.get_config(bad)


def test_depth_and_data_flags(tmp_path):
    assert runs.parse_depths(["56", "20", "20"], [8]) == [20, 56]
    assert runs.parse_depths(None, [56, 20]) == [20, 56]
    for bad in ("21", "2", "x", ""):
        with pytest.raises(UserError):
            runs.parse_depths([bad], [20])
    npz = tmp_path / "c.npz"
    npz.write_bytes(b"")
    assert runs.parse_data(f"npz:{npz}") == ("npz", {"data.path": str(npz)})
    assert runs.parse_data(None) == ("", {}) and runs.parse_data("tfds") == ("tfds", {})
    for bad in ("npz", "npz:/no/such.npz", "imagenet"):
        with pytest.raises(UserError):
            runs.parse_data(bad)


def test_ablation_plan_shares_the_baseline_and_names_its_overrides():
    planned = skip_ablation.plan(["shortcut", "zero_init", "bn"], "smoke", 8, seeds=1, data=None, bn_devices=2)
    by_name = {r.name: r for r in planned}
    assert list(by_name) == ["resnet8_baseline_seed0", "resnet8_shortcutB_seed0", "resnet8_shortcutC_seed0",
                             "resnet8_zeroinit_seed0", "resnet8_bnsync_2dev_seed0", "resnet8_bnlocal_2dev_seed0"]
    assert dict(by_name["resnet8_baseline_seed0"].info)["studies"] == ("shortcut", "zero_init")
    assert by_name["resnet8_bnlocal_2dev_seed0"].command("/w") == (
        "XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m resnet_jax.main "
        "--config=configs/cifar.py:resnet8,smoke --config.model.bn_sync=False --workdir=/w")
    assert by_name["resnet8_shortcutC_seed0"].config().model.shortcut == "C"
    assert by_name["resnet8_zeroinit_seed0"].config().model.zero_init_residual is True


def test_a_run_on_other_devices_is_its_command_in_a_subprocess(tmp_path):
    """Per-device BN on 2 simulated devices from a 1-device process: resnet_jax.main in a
    subprocess; its results are read back, and the finished run is then skipped."""
    run = runs.make_run("bnlocal", "resnet8,smoke", {"model.bn_sync": False, "train.total_steps": 4}, devices=2)
    lines = []
    done = runs.run_or_skip(run, str(tmp_path / "bnlocal"), lines.append)
    assert jax.device_count() == 1 and done["step"] == done["total_steps"] == 4
    assert lines == [f"bnlocal: training: {run.command(str(tmp_path / 'bnlocal'))}"]
    records = [json.loads(line) for line in open(tmp_path / "bnlocal" / "metrics.jsonl")]
    last = [r for r in records if r["split"] == "test"][-1]
    assert done["results"]["test"]["error"] == last["error"] and done["results"]["test"]["examples"] == 128
    assert json.loads((tmp_path / "bnlocal" / "config.json").read_text())["model.bn_sync"] is False
    assert runs.run_or_skip(run, str(tmp_path / "bnlocal"), lines.append) == done
    assert lines[-1] == "bnlocal: finished earlier (step 4), skipping"


def test_network_order_is_numeric():
    paths = [("stage1_block10", "conv1"), ("stage2_block1", "proj_conv"), ("stage1_block2", "conv2"),
             ("stage2_block1", "conv1"), ("stem_conv",), ("stage1_block2", "conv1")]
    assert sorted(paths, key=skip_ablation.network_order) == [
        ("stem_conv",), ("stage1_block2", "conv1"), ("stage1_block2", "conv2"), ("stage1_block10", "conv1"),
        ("stage2_block1", "conv1"), ("stage2_block1", "proj_conv")]


def _conv_kernels(model_name: str) -> list[str]:
    model = models.create(model_name)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    leaves = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return ["/".join(k.key for k in path[:-1]) for path, leaf in leaves if path[-1].key == "kernel" and leaf.ndim == 4]


def test_gradient_flow_one_finite_value_per_conv(tmp_path):
    profiles = skip_ablation.gradient_flow(depths=(14,), batch=8)
    assert [(p["name"], p["skip"], p["depth"]) for p in profiles] == [("plain-14", False, 14), ("ResNet-14", True, 14)]
    expected_order = ["stem_conv"] + [f"stage{s}_block{b}/conv{c}" for s in (1, 2, 3) for b in (1, 2) for c in (1, 2)]
    for profile in profiles:
        kernels = _conv_kernels(f"{'resnet' if profile['skip'] else 'plain'}14")
        assert len(kernels) == 13 and sorted(kernels) == sorted(expected_order)
        assert profile["layers"] == expected_order  # network order, input side first
        for key in ("grad_norms", "activation_scales"):
            values = np.asarray(profile[key])
            assert values.shape == (13,) and np.all(np.isfinite(values)) and np.all(values > 0), (key, values)
        assert math.isfinite(profile["loss"]) and 1.0 < profile["loss"] < 5.0  # ~ln 10 at init
    # Same images, same init: the stem sees identical inputs in both nets.
    assert profiles[0]["grad_norms"] != profiles[1]["grad_norms"]
    assert profiles[0]["activation_scales"][0] == pytest.approx(profiles[1]["activation_scales"][0], rel=1e-5)
    _assert_png(plots.gradient_flow_png(profiles, tmp_path / "gradient_flow.png"))


def test_gradient_profile_matches_direct_gradients():
    """The probe's numbers against jax.grad and a hand-written first convolution (ResNet-8)."""
    import optax

    images, labels = skip_ablation.probe_batch(None, 4)
    profile = skip_ablation.gradient_profile("resnet8", images, labels, seed=1)
    model = models.create("resnet8")
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)), train=False))()

    def loss_fn(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.jit(jax.grad(loss_fn))(variables["params"])
    direct = [float(jnp.linalg.norm(grads[p[0]]["kernel"] if len(p) == 1 else grads[p[0]][p[1]]["kernel"]))
              for p in (layer.split("/") for layer in profile["layers"])]
    np.testing.assert_allclose(profile["grad_norms"], direct, rtol=1e-4)
    stem = jax.lax.conv_general_dilated(images, variables["params"]["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert profile["activation_scales"][0] == pytest.approx(float(jnp.std(stem)), rel=1e-4)
