"""The weight EMA (train.ema_decay): timm's decay, the update inside the step, a run that
resumes with its EMA, evaluate/export of the EMA weights. (Runs without one: tests/test_train.py's
resume test and tests/test_evaluate.py's error lines.)

The runs are the CIFAR smoke variant (16x16 synthetic images) with LAMB, ResNet-8, trained
in-process once for the module: 8 steps straight, and 4 + 4 resumed.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import safetensors.numpy

from configs import cifar
from helpers import override, read_jsonl, restore_state, tiny_config, tree_equal
from resnet_jax import convert, ema, evaluate, reporting, steps, train
from resnet_jax.data import device as device_data
from resnet_jax.data import sources


def _ema_config(decay, warmup=False, gamma=1.0, power=2 / 3):
    return ml_collections.ConfigDict({"ema_decay": decay, "ema_warmup": warmup, "ema_warmup_gamma": gamma,
                                      "ema_warmup_power": power})


def timm_get_decay(step, decay, use_warmup=False, warmup_gamma=1.0, warmup_power=2 / 3, min_decay=0.0,
                   update_after_step=0):
    """timm.utils.model_ema.ModelEmaV3.get_decay, as timm writes it (float64 on the host)."""
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        d = 1 - (1 + step / warmup_gamma) ** -warmup_power
        d = max(min(d, decay), min_decay)
    else:
        d = decay
    return d


@pytest.mark.parametrize("decay,warmup,gamma,power", [(0.9999, True, 1.0, 2 / 3), (0.99, True, 10.0, 0.75),
                                                      (0.9, False, 1.0, 2 / 3)])
def test_step_size_is_one_minus_timms_decay(decay, warmup, gamma, power):
    step_size = ema.step_size_schedule(_ema_config(decay, warmup, gamma, power))
    for updates in (1, 2, 3, 10, 1000, 31_623, 10**6):
        theirs = timm_get_decay(updates, decay, warmup, gamma, power)
        ours = float(jax.jit(step_size)(updates))
        assert 1 - ours == pytest.approx(theirs, abs=1e-7), updates
        assert ours == pytest.approx(1 - theirs, rel=1e-6), updates  # 1 - decay is not rounded away
    if warmup:  # the warm-up reached its cap, and below it, timm's comment: 0.999 at 31.6k updates
        assert 1 - float(step_size(10**9)) == pytest.approx(decay, abs=1e-7)
    assert float(step_size(1)) == 1.0  # timm's first update copies the weights


def _constant_gradient_steps(decay: float, num_steps: int, lr: float = 0.1):
    """num_steps of steps.train_step on resnet8/digits with a gradient of ones: params
    p_k = p_0 - k lr; returns every state (BN statistics from the real forward pass)."""
    config = tiny_config()
    model = steps.build_model(config)
    tx = optax.chain(optax.stateless(lambda grads, params: jax.tree.map(jnp.ones_like, grads)), optax.sgd(lr))
    state = steps.create_train_state(model, tx, 0, (8, 8, 1), with_ema=True)
    batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 1)),
             "label": jnp.arange(16) % 10}
    step = jax.jit(lambda s: steps.train_step(s, batch, jax.random.PRNGKey(2), model=model, tx=tx, bn_sync=True,
                                              axis_name=None, ema_step_size=ema.step_size_schedule(
                                                  _ema_config(decay)))[0])
    states = [state]
    for _ in range(num_steps):
        states.append(step(states[-1]))
    return states


def test_ema_on_a_constant_gradient_is_the_closed_form():
    """timm's EMA copies the weights at the first update, then ema_k = d ema_(k-1) + (1 - d) p_k.
    With p_k = p_0 - k c, the lag e_k = ema_k - p_k obeys e_k = d (e_(k-1) + c), e_1 = 0:
    ema_k = p_k + c d (1 - d^(k-1)) / (1 - d)."""
    d, k, c = 0.8, 6, 0.1
    states = _constant_gradient_steps(d, k, lr=c)
    last = states[-1]
    lag = c * d * (1 - d ** (k - 1)) / (1 - d)
    closed = jax.tree.map(lambda p: np.asarray(p, np.float64) + lag, last.params)
    for ours, expected in zip(jax.tree.leaves(last.ema["params"]), jax.tree.leaves(closed)):
        np.testing.assert_allclose(np.asarray(ours, np.float64), expected, rtol=1e-5, atol=1e-6)
    # The BN statistics are averaged the same way, from the statistics of each step.
    expected = states[1].batch_stats
    for state in states[2:]:
        expected = jax.tree.map(lambda e, x: d * np.asarray(e, np.float64) + (1 - d) * np.asarray(x, np.float64),
                                expected, state.batch_stats)
    for ours, theirs in zip(jax.tree.leaves(last.ema["batch_stats"]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(ours, np.float64), theirs, rtol=1e-5, atol=1e-6)
    assert not tree_equal(last.ema, {"params": last.params, "batch_stats": last.batch_stats})


def test_ema_with_decay_zero_is_the_weights():
    states = _constant_gradient_steps(0.0, 3)
    for state in states[1:]:
        assert tree_equal(state.ema, {"params": state.params, "batch_stats": state.batch_stats})
    params = {"w": jnp.array([1.0, -2.0, 3.5])}
    assert tree_equal(ema.update(ema.initial({"w": jnp.zeros(3)}, {}), params, {}, jnp.float32(1.0))["params"], params)


# -- runs -----------------------------------------------------------------------------

SMOKE = {"optim.name": "lamb", "train.ema_decay": 0.9, "optim.schedule": "constant", "optim.lr": 0.01,
         "train.progress": False, "train.steps_per_dispatch": 1}


def _smoke(**overrides):
    """configs/cifar.py:resnet8,smoke (8 steps, evaluations and checkpoints at 4 and 8) with `overrides`."""
    return override(cifar.get_config("resnet8,smoke"), {**SMOKE, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The smoke run with LAMB and an EMA: 8 steps straight, and 4 steps then resumed to 8."""
    straight, resumed = (str(tmp_path_factory.mktemp(name)) for name in ("straight", "resumed"))
    result = train.train_and_evaluate(_smoke(), straight)
    train.train_and_evaluate(_smoke(**{"train.total_steps": 4}), resumed)
    train.train_and_evaluate(_smoke(), resumed)
    return straight, resumed, result


def test_an_ema_run_resumes_bitwise_with_its_ema(runs, capsys):
    straight, resumed, result = runs
    a, step = restore_state(straight)
    b, _ = restore_state(resumed)
    assert step == 8 and a.ema is not None
    assert tree_equal(a, b)  # params, optimiser and the EMA, every leaf
    assert tree_equal(a.ema, b.ema) and not tree_equal(a.ema["params"], a.params)
    # The EMA resumed at step 4 is the one saved there (not restarted from the weights).
    a4, _ = restore_state(straight, 4)
    b4, _ = restore_state(resumed, 4)
    assert tree_equal(a4.ema, b4.ema) and not tree_equal(a4.ema["params"], a4.params)
    assert _items(straight, 8) == {"ema", "meta", "optimizer", "variables"}
    evals = [r for r in read_jsonl(os.path.join(straight, "metrics.jsonl")) if r["split"] == "test"]
    assert [r["step"] for r in evals] == [4, 8]
    assert {"ema_loss", "ema_error", "ema_top5_error"} <= set(evals[-1])
    assert result["test"]["ema_error"] == evals[-1]["ema_error"]
    assert evals[-1]["ema_loss"] != evals[-1]["loss"]


def _items(workdir, step) -> set[str]:
    """The Orbax items of a checkpoint (its directories)."""
    folder = os.path.join(workdir, "checkpoints", str(step))
    return {name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))}


def _direct_evaluation(workdir, config, variables):
    """Loss and error of `variables` on the run's test split, by model.apply on inputs
    normalised here (per-pixel mean of the training split, as the recipe says)."""
    train_split = sources.load_split(config.data, config.data.train_split)
    mean, std = device_data.normalization_stats(config.data, train_split)
    test = sources.load_split(config.data, "test")
    inputs = ((test.images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
    apply = jax.jit(steps.build_model(config).apply, static_argnames="train")  # one compile, not op by op
    logits = np.asarray(apply(variables, inputs, train=False), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(test.labels)), test.labels].mean(), np.mean(logits.argmax(-1) != test.labels)


def test_evaluate_ema_weights_reports_the_ema(runs, tmp_path):
    straight, _, _ = runs
    report = evaluate.report(straight, checkpoint="latest", weights="ema", out_dir=str(tmp_path / "ema"))
    state, _ = restore_state(straight)
    ema_loss, ema_error = _direct_evaluation(straight, _smoke(), state.ema)
    raw_loss, raw_error = _direct_evaluation(straight, _smoke(), {"params": state.params,
                                                                  "batch_stats": state.batch_stats})
    assert report["weights"] == "ema" and report["checkpoint"]["step"] == 8
    assert report["loss"] == pytest.approx(ema_loss, rel=1e-5) and report["error"] == ema_error
    assert report["loss"] != pytest.approx(raw_loss, rel=1e-3)  # not the raw weights' numbers
    # Training's own evaluation of the step: the EMA's under ema_*, the raw weights' under the plain keys.
    logged = [r for r in read_jsonl(os.path.join(straight, "metrics.jsonl")) if r["split"] == "test"][-1]
    assert report["recorded_error"] == logged["ema_error"] == ema_error
    assert logged["ema_loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert logged["loss"] == pytest.approx(raw_loss, rel=1e-5) and logged["error"] == raw_error
    assert "its weight EMA" in open(tmp_path / "ema" / "report.md").read()
    # convert export --weights=ema writes the EMA's arrays under torch's names.
    done = convert.export_weights(straight, str(tmp_path / "ema.safetensors"), "latest", weights="ema")
    written = safetensors.numpy.load_file(str(tmp_path / "ema.safetensors"))
    expected = convert.to_state_dict(state.ema["params"], state.ema["batch_stats"], done["format"], batches_tracked=8)
    assert done["weights"] == "ema" and written.keys() == expected.keys()
    assert all(np.array_equal(written[k], expected[k]) for k in expected)


def test_the_eval_line_and_record_carry_the_ema(tmp_path, capsys):
    reporter = reporting.Reporter(str(tmp_path), total_steps=100, start_step=0, progress=False)
    result = {"loss": 0.3, "error": 0.0981, "top5_error": 0.0042, "examples": 10_000, "ema_loss": 0.25,
              "ema_error": 0.0912, "ema_top5_error": 0.004}
    reporter.evaluated(50, {"test": result}, 50, 0.0981, "test")
    reporter.close()
    assert capsys.readouterr().out.splitlines()[-1] == \
        "eval step 50: test err 9.81 % (top-5 0.42 %), EMA 9.12 %, best 9.81 % @ 50"
    assert reporting.read_metrics(str(tmp_path)) == [{"step": 50, "split": "test", **result}]
