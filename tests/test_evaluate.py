"""resnet_jax.evaluate: a trained workdir -> metrics.json, PNGs and report.md.

One tiny digits run is trained once for the module; the evaluator's numbers are checked
against logits recomputed here with `model.apply` and plain numpy, against what training
itself logged, and across device counts and both parallel backends.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from configs import digits
from resnet_jax import convert, evaluate, rundir, steps, train
from resnet_jax.checkpoint import Checkpoints, abstract_like
from resnet_jax.data import sources
from resnet_jax.errors import UserError
from resnet_jax.parallel import Parallel

PNGS = ("confusion_matrix.png", "mistakes.png", "activations.png", "curves.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 40-step resnet8 digits run with checkpoints and evaluations at steps 20 and 40."""
    config = digits.get_config()
    config.train.update(total_steps=40, eval_every=20, checkpoint_every=20, log_every=10,
                        steps_per_dispatch=10, progress=False)
    workdir = str(tmp_path_factory.mktemp("run"))
    result = train.train_and_evaluate(config, workdir)
    return workdir, config, result


@pytest.fixture(scope="module")
def evaluated(run):
    workdir, _, _ = run
    return evaluate.report(workdir)  # defaults: split "test", checkpoint "best"


def test_load_config_round_trips(run):
    workdir, config, _ = run
    loaded = rundir.load_config(workdir)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.optim.boundaries, tuple)  # stored as a JSON list


def test_metrics_agree_with_numpy_on_independent_logits(run, evaluated):
    workdir, config, result = run
    step = evaluated["checkpoint"]["step"]
    assert step == result["best"]["step"] and evaluated["checkpoint"]["requested"] == "best"

    # The state at that step, restored here; logits from model.apply on inputs normalised in numpy.
    parallel = Parallel()
    trainer = train.Trainer(config, parallel)
    abstract = jax.eval_shape(lambda: steps.create_train_state(trainer.eval_model, trainer.tx, 0, (8, 8, 1)))
    checkpoints = Checkpoints(workdir)
    restored, _, restored_step = checkpoints.restore(abstract_like(abstract, parallel.replicated), step)
    checkpoints.close()
    assert restored_step == step and int(restored.step) == step
    variables = {"params": parallel.unreplicate(restored.params),
                 "batch_stats": parallel.unreplicate(restored.batch_stats)}
    train_pixels = sources.load_split(config.data, "train").images.reshape(-1, 1).astype(np.float64)
    test = sources.load_split(config.data, "test")
    inputs = (test.images - train_pixels.mean(0)) / train_pixels.std(0)  # per_channel normalisation
    logits = np.asarray(steps.build_model(config).apply(variables, inputs.astype(np.float32), train=False),
                        np.float64)

    labels = test.labels
    predictions = logits.argmax(-1)
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, predictions), 1)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    top5 = np.argsort(-logits, axis=-1)[:, :5]

    assert evaluated["num_examples"] == len(labels) == 360
    np.testing.assert_array_equal(np.asarray(evaluated["confusion_matrix"]), confusion)
    assert evaluated["accuracy"] == pytest.approx(np.mean(predictions == labels), abs=1e-12)
    assert evaluated["error"] == pytest.approx(1 - np.mean(predictions == labels), abs=1e-12)
    assert evaluated["top5_error"] == pytest.approx(1 - np.mean((top5 == labels[:, None]).any(-1)), abs=1e-12)
    assert evaluated["loss"] == pytest.approx(-log_probs[np.arange(len(labels)), labels].mean(), rel=1e-4)
    recall = np.diag(confusion) / confusion.sum(1)
    precision = np.diag(confusion) / np.maximum(confusion.sum(0), 1)
    for row in evaluated["per_class"]:
        i = row["index"]
        assert row["class"] == str(i) and row["support"] == confusion[i].sum()
        assert row["recall"] == pytest.approx(recall[i]) and row["precision"] == pytest.approx(precision[i])
    assert evaluated["macro_avg"]["recall"] == pytest.approx(recall.mean())
    # Training's own (on-device, batched) evaluation of that step says the same.
    assert evaluated["recorded_error"] == pytest.approx(evaluated["error"], abs=1e-6)
    assert evaluated["split"] == {"name": "test", "spec": "test"}


def test_report_files(evaluated):
    out_dir = evaluated["out_dir"]
    with open(os.path.join(out_dir, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["error"] == evaluated["error"] and saved["checkpoint"] == evaluated["checkpoint"]
    for name in PNGS:
        with Image.open(os.path.join(out_dir, name)) as image:
            image.load()  # decodes the whole file
            width, height = image.size
        assert 300 <= width <= 6000 and 150 <= height <= 6000, (name, image.size)
    with open(os.path.join(out_dir, "report.md")) as f:
        markdown = f.read()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(linked) == sorted(PNGS)  # relative links, each to a file that exists
    assert all(os.path.isfile(os.path.join(out_dir, link)) for link in linked)
    assert f"step {evaluated['checkpoint']['step']}" in markdown and "resnet8" in markdown
    assert f"{100 * evaluated['error']:.2f} %" in markdown
    class_rows = [line for line in markdown.splitlines() if re.match(r"\| \d \| [0-9.]+ \|", line)]
    assert len(class_rows) == 10 and "**macro avg**" in markdown and "**weighted avg**" in markdown


def test_checkpoint_choices(run, tmp_path):
    workdir, _, result = run
    first = evaluate.report(workdir, split="train[:100]", checkpoint="20", out_dir=str(tmp_path / "first"))
    assert first["checkpoint"] == {"requested": "20", "step": 20, "note": None}
    assert first["num_examples"] == 100 and first["split"] == {"name": "train[:100]", "spec": "train[:100]"}
    assert first["recorded_error"] is None  # training evaluated "test", not this slice
    with pytest.raises(UserError, match=r"no checkpoint at step 7 .*have \[20, 40\]"):
        evaluate.report(workdir, checkpoint=7)

    # Which step "best" and "latest" pick, and the fallbacks of "best" (metadata edited in a copy).
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("report", "tensorboard"))
    checkpoints = Checkpoints(str(copy))
    try:
        assert rundir.choose_checkpoint(checkpoints, "latest") == (None, None)
        assert rundir.choose_checkpoint(checkpoints, "best") == (result["best"]["step"], None)
        assert rundir.choose_checkpoint(checkpoints, 20) == (20, None)
        meta_path = copy / "checkpoints" / "40" / "meta" / "metadata"
        meta = json.loads(meta_path.read_text())
        for best, expected in ((None, "no best step recorded"), (30, "best step 30 is no longer on disk")):
            meta_path.write_text(json.dumps(dict(meta, best_step=best)))
            step, note = rundir.choose_checkpoint(checkpoints, "best")
            assert step is None and expected in note and "using the latest" in note
    finally:
        checkpoints.close()
    for bad in ("nope", "-3", "1.5"):
        with pytest.raises(UserError, match="--checkpoint must be best, latest or a step number"):
            rundir.parse_checkpoint(bad)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "resnet_jax.evaluate", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_bad_input_is_one_line_and_exit_2(run, tmp_path):
    workdir, _, _ = run
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), config_only)
    cases = {
        "no run in": ["--workdir", str(tmp_path / "missing")],
        "no checkpoints in": ["--workdir", str(config_only)],
        "unknown split 'bogus'.*eval splits \\(test\\)": ["--workdir", workdir, "--split", "bogus"],
        "--checkpoint must be": [f"--workdir={workdir}", "--checkpoint=nope"],
        "the run in .* has no weight EMA \\(it trained with train.ema_decay=0\\); use --weights=raw":
            [f"--workdir={workdir}", "--weights=ema"],
        "unknown --weights='best'; choose from raw, ema": [f"--workdir={workdir}", "--weights=best"],
    }
    for expected, args in cases.items():
        result = _cli(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, result.stderr[-2000:])
        assert re.search(expected, lines[0]) and "Traceback" not in result.stderr, lines[0]
    assert not os.path.exists(config_only / "checkpoints")  # nothing was created
    with pytest.raises(UserError, match="has no weight EMA"):  # nor can export write one
        convert.export_weights(workdir, str(tmp_path / "ema.safetensors"), weights="ema")
    assert not os.path.exists(tmp_path / "ema.safetensors")


def test_same_numbers_on_seven_devices_with_shard_map_and_pmap(run, evaluated, tmp_path):
    """360 test images over 7 devices: batches of 364, padding masked, every example once."""
    workdir, _, _ = run
    pmap_run = tmp_path / "pmap_run"
    shutil.copytree(workdir, pmap_run, ignore=shutil.ignore_patterns("report", "tensorboard"))
    flat = json.loads((pmap_run / "config.json").read_text())
    (pmap_run / "config.json").write_text(json.dumps(dict(flat, **{"parallel.backend": "pmap"})))
    script = textwrap.dedent(f"""
        import jax
        from resnet_jax import evaluate
        assert jax.device_count() == 7
        evaluate.main(["resnet_jax.evaluate", "--workdir", {workdir!r}, "--out_dir", {str(tmp_path / "shard_map")!r}])
        evaluate.report({str(pmap_run)!r}, out_dir={str(tmp_path / "pmap")!r})
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=7", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 cpu device(s)" in result.stdout and "shard_map" in result.stdout and "pmap" in result.stdout
    for name in ("shard_map", "pmap"):
        other = json.loads((tmp_path / name / "metrics.json").read_text())
        assert other["devices"].startswith("7 cpu") and other["devices"].endswith(name)
        assert other["num_examples"] == 360 and other["checkpoint"] == evaluated["checkpoint"]
        assert other["confusion_matrix"] == evaluated["confusion_matrix"]
        assert other["loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
        assert other["top5_error"] == evaluated["top5_error"]
