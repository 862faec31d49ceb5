"""The trainer on the streaming pipeline: the ImageNet recipe trains a few steps
from a tiny TFDS dataset of JPEGs, and resumes the exact data order from its checkpoint."""

import pytest

import tiny_imagenet_builder
from configs import imagenet
from helpers import restore_state, tree_equal
from resnet_jax import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    tiny_imagenet_builder.prepare_tiny(path)
    return path


def _config(data_dir, total_steps):
    config = imagenet.get_config("resnet18")
    config.data.name, config.data.data_dir = tiny_imagenet_builder.NAME, data_dir
    config.data.num_classes = tiny_imagenet_builder.NUM_CLASSES
    config.data.image_size, config.data.eval_resize, config.data.workers = 32, 36, 0
    config.model.dtype = "float32"
    config.train.batch_size, config.train.eval_batch_size = 8, 8
    config.train.total_steps, config.train.total_epochs, config.train.log_every = total_steps, 0, 2
    config.train.eval_every, config.train.checkpoint_every = 4, 2
    config.train.progress = False
    config.optim.schedule = "constant"
    return config


def test_imagenet_recipe_trains_through_the_stream(tmp_path, data_dir):
    result = train.train_and_evaluate(_config(data_dir, 4), str(tmp_path))
    assert result["val"]["examples"] == tiny_imagenet_builder.SPLIT_SIZES["validation"]  # exact, padded
    assert result["step"] == 4


def test_resume_continues_the_stream_exactly(tmp_path, data_dir):
    train.train_and_evaluate(_config(data_dir, 6), str(tmp_path / "straight"))
    train.train_and_evaluate(_config(data_dir, 2), str(tmp_path / "resumed"))
    train.train_and_evaluate(_config(data_dir, 6), str(tmp_path / "resumed"))  # continues from step 2
    straight, _ = restore_state(tmp_path / "straight")
    resumed, step = restore_state(tmp_path / "resumed")
    assert step == 6 and tree_equal(straight, resumed)
