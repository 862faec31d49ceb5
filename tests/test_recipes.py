"""The recipe variants (configs/cifar.py `modern`, configs/imagenet.py `rsb_a3`, `ffcv_16`):
each sets what its source says, and each trains end to end on tiny data and resumes."""

import pytest

from configs import cifar
from helpers import read_jsonl, restore_state
from resnet_jax import config as config_lib
from resnet_jax import train


def _set(config, overrides: dict):
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def test_cifar_modern_sets_the_recipe_and_keeps_the_schedule():
    paper, modern = cifar.get_config("resnet56"), cifar.get_config("resnet56,modern")
    config_lib.validate(modern, 1)
    assert (modern.optim.schedule, modern.optim.nesterov, modern.optim.weight_decay) == ("cosine", True, 5e-4)
    assert (modern.optim.label_smoothing, modern.data.cutmix_alpha, modern.data.mix_prob) == (0.1, 1.0, 0.5)
    assert (modern.train.ema_decay, modern.train.ema_warmup, modern.optim.decay_bn_and_bias) == (0.999, True, False)
    assert modern.train.total_steps == paper.train.total_steps == 64_000  # the same schedule length
    assert modern.model.to_dict() == paper.model.to_dict()
    smoke = cifar.get_config("resnet8,modern,smoke")
    assert smoke.train.total_steps == 8 and smoke.train.ema_decay == 0.999


def test_cifar_modern_smoke_trains_end_to_end_and_resumes(tmp_path, capsys):
    quick = {"train.progress": False, "train.steps_per_dispatch": 1}
    workdir = str(tmp_path)
    first = train.train_and_evaluate(_set(cifar.get_config("resnet8,modern,smoke"),
                                          {**quick, "train.total_steps": 4}), workdir)
    assert first["step"] == 4
    result = train.train_and_evaluate(_set(cifar.get_config("resnet8,modern,smoke"), quick), workdir)
    out = capsys.readouterr().out
    assert result["step"] == 8 and "resuming at step 4" in out, out[-2000:]
    assert "dominant label" in out  # the log says what the train error means under CutMix
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "ema_error" in r]
    assert [r["step"] for r in evals] == [4, 8]
    state, step = restore_state(workdir)
    assert step == 8 and state.ema is not None
