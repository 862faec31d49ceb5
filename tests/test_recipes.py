"""The recipe variants (configs/cifar.py `modern`, configs/imagenet.py `rsb_a3`, `ffcv_16`):
each sets what its source says, and each trains end to end on tiny data and resumes."""

import pytest

from configs import cifar
from helpers import override, read_jsonl, restore_state
from resnet_jax import config as config_lib
from resnet_jax import train


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
    first = train.train_and_evaluate(override(cifar.get_config("resnet8,modern,smoke"),
                                          {**quick, "train.total_steps": 4}), workdir)
    assert first["step"] == 4
    result = train.train_and_evaluate(override(cifar.get_config("resnet8,modern,smoke"), quick), workdir)
    out = capsys.readouterr().out
    assert result["step"] == 8 and "resuming at step 4" in out, out[-2000:]
    assert "dominant label" in out  # the log says what the train error means under CutMix
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "ema_error" in r]
    assert [r["step"] for r in evals] == [4, 8]
    state, step = restore_state(workdir)
    assert step == 8 and state.ema is not None


# The ImageNet recipes on the tiny TFDS set of JPEGs (tests/tiny_imagenet_builder.py), with
# resnet18 for resnet50 and 32 px for 160 (40 for the test size) so they run in seconds.
TINY = {"model.name": "resnet18", "model.dtype": "float32", "data.image_size": 32, "data.eval_image_size": 40,
        "data.eval_resize": 44, "data.workers": 0, "train.batch_size": 8, "train.eval_batch_size": 8,
        "train.total_epochs": 0, "train.log_every": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
        "train.progress": False}


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    import tiny_imagenet_builder

    path = str(tmp_path_factory.mktemp("tfds"))
    tiny_imagenet_builder.prepare_tiny(path)
    return {"data.name": tiny_imagenet_builder.NAME, "data.data_dir": path,
            "data.num_classes": tiny_imagenet_builder.NUM_CLASSES}


def test_rsb_a3_is_timms_a3():
    from configs import imagenet

    config = imagenet.get_config("resnet50,rsb_a3")
    config_lib.validate(config, 8)
    assert (config.data.image_size, config.data.eval_image_size, config.data.eval_resize) == (160, 224, 235)
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("lamb", 8e-3, 0.02)
    assert (config.train.loss, config.train.bce_target_threshold, config.optim.label_smoothing) == ("sigmoid", 0.2, 0.0)
    assert (config.data.mixup_alpha, config.data.cutmix_alpha, config.data.mix_prob) == (0.1, 1.0, 1.0)
    assert (config.train.batch_size, config.train.total_epochs, config.optim.warmup_epochs) == (2048, 100, 5)
    assert config.model.zero_init_residual and not config.optim.decay_bn_and_bias


def test_ffcv_16_is_ffcvs_16_epochs():
    from configs import imagenet
    from resnet_jax import optim

    config = imagenet.get_config("resnet50,ffcv_16")
    config_lib.validate(config, 8)
    assert (config.train.batch_size, config.optim.lr, config.optim.label_smoothing) == (4096, 1.7, 0.1)
    assert (config.data.image_size, config.data.eval_image_size, config.train.total_epochs) == (160, 256, 16)
    schedule = optim.make_schedule(config.optim, 100, 1600)  # 100 steps an epoch
    for step, lr in ((0, 1.7e-4), (200, 1.7), (900, 0.85), (1600, 0.0)):
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-6), step
    config.train.batch_size = 1024  # the lr follows the batch, as in FFCV's rule
    assert config.optim.lr == pytest.approx(0.425) and config.optim.warmup_lr == pytest.approx(0.425e-4)


@pytest.mark.parametrize("recipe", ["rsb_a3", "ffcv_16"])
def test_imagenet_recipe_smoke_trains_end_to_end_and_resumes(recipe, tiny_imagenet, tmp_path, capsys):
    from configs import imagenet
    from resnet_jax.data import stream

    def config(total_steps):
        return override(imagenet.get_config(f"resnet50,{recipe}"),
                    {**TINY, **tiny_imagenet, "train.total_steps": total_steps, "optim.warmup_epochs": 0.25})

    assert train.train_and_evaluate(config(2), str(tmp_path))["step"] == 2
    result = train.train_and_evaluate(config(4), str(tmp_path))
    out = capsys.readouterr().out
    assert result["step"] == 4 and "resuming at step 2" in out, out[-2000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "val"] == [2, 4]
    evaluation = stream.make_stream(config(4), "validation", train=False, global_batch_size=8, seed=0)
    try:
        assert next(evaluation)["image"].shape == (8, 40, 40, 3)  # tested larger than trained
    finally:
        evaluation.close()
