"""resnet_jax.convert and torch_files: torch's weights in and out, checked against torch's own
logits without torch.

tests/fixtures/convert/ was made once with torch by scripts/make_convert_fixture.py: for
torchvision's resnet18 and resnet50 and akamaster's ResNet-20, the keys and shapes of the
state dict, a seeded uint8 image and torch's logits on it. The weights themselves are drawn
again here from the seed (`seeded_tensor`, numpy only), converted, and run.
"""

import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from helpers import read_jsonl
from resnet_jax import cli, convert, models, restore, rundir, steps, torch_files, train
from resnet_jax.data import IMAGENET_MEAN, IMAGENET_STD, augment
from resnet_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "convert")
_spec = importlib.util.spec_from_file_location("make_convert_fixture",
                                               os.path.join(ROOT, "scripts", "make_convert_fixture.py"))
fixture_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture_script)  # numpy only at import time: torch is imported in its main()

# fixture -> our model name
MODELS = {"resnet18": "resnet18", "resnet50": "resnet50", "akamaster_resnet20": "resnet20"}


def _fixture(name: str) -> dict:
    with np.load(os.path.join(FIXTURES, f"{name}.npz")) as f:
        keys = [(key, tuple(shape)) for key, shape in json.loads(str(f["keys"]))]
        seed = int(f["seed"])
        return {"keys": keys, "format": str(f["format"]), "image": f["image"], "logits": f["logits"],
                "state_dict": {key: fixture_script.seeded_tensor(key, shape, seed) for key, shape in keys}}


def _abstract(model, image_shape) -> dict:
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def _config(*args: str):
    """The config `python -m resnet_jax.main --config=... ARGS` would train."""
    return cli.config_from_args(list(args))


def _write_seeded(path: str, keys) -> dict:
    state_dict = {key: fixture_script.seeded_tensor(key, shape) for key, shape in keys}
    safetensors.numpy.save_file(state_dict, path)
    return state_dict


def _flat(tree) -> dict:
    from flax import traverse_util

    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


# ---------------------------------------------------------------------------------------
# Logits, names and layouts against torch.


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_weights_give_torchs_logits(name):
    fixture = _fixture(name)
    model = models.create(MODELS[name], num_classes=fixture["logits"].shape[1])
    image = fixture["image"]
    abstract = _abstract(model, image.shape[1:])
    params, batch_stats = convert.from_state_dict(fixture["state_dict"], fixture["format"], abstract, name, name)

    # The preprocessing of data.normalization=imagenet, as the pipelines apply it.
    x = augment.normalize(jnp.asarray(image), jnp.float32(IMAGENET_MEAN), jnp.float32(IMAGENET_STD))
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
        {"params": params, "batch_stats": batch_stats}, x))
    expected = fixture["logits"]
    relative = np.abs(logits - expected).max() / np.abs(expected).max()
    assert relative <= 1e-5, relative
    # The part of the logits that depends on the image, too (a random net's logits share a large offset).
    difference, expected_difference = logits[0] - logits[1], expected[0] - expected[1]
    assert np.abs(difference - expected_difference).max() / np.abs(expected_difference).max() <= 1e-4

    # Back to torch: torch's keys in torch's order (num_batches_tracked included), values bitwise.
    back = convert.to_state_dict(params, batch_stats, fixture["format"])
    assert [(k, v.shape) for k, v in back.items()] == fixture["keys"]
    for key, value in fixture["state_dict"].items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
        assert back[key].flags.c_contiguous


def test_imagenet_normalization_is_the_weights_preprocessing():
    """pixels / 255 then (x - mean) / std (torchvision's transforms) == the pipelines' (x - 255 mean) / (255 std)."""
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
    torch_way = (pixels.astype(np.float32) / np.float32(255) - np.float32(fixture_script.IMAGENET_MEAN)) / np.float32(
        fixture_script.IMAGENET_STD)
    ours = np.asarray(augment.normalize(jnp.asarray(pixels), jnp.float32(IMAGENET_MEAN), jnp.float32(IMAGENET_STD)))
    assert np.abs(ours - torch_way).max() < 2e-6


def test_mismatches_name_the_first_key_that_does_not_fit():
    fixture = _fixture("akamaster_resnet20")
    state_dict = fixture["state_dict"]
    resnet20 = _abstract(models.create("resnet20"), (32, 32, 3))
    with pytest.raises(UserError, match=r"key 'linear.weight' has shape \(10, 64\), resnet20 needs \(100, 64\)"):
        convert.from_state_dict(state_dict, "akamaster", _abstract(models.create("resnet20", 100), (32, 32, 3)),
                                "f.th", "resnet20")
    with pytest.raises(UserError, match=r"no key 'layer1.3.conv1.weight', which resnet26 needs"):
        convert.from_state_dict(state_dict, "akamaster", _abstract(models.create("resnet26"), (32, 32, 3)),
                                "f.th", "resnet26")
    with pytest.raises(UserError, match=r"key 'layer1.2.conv1.weight' .* is not a variable of resnet14"):
        convert.from_state_dict(state_dict, "akamaster", _abstract(models.create("resnet14"), (32, 32, 3)),
                                "f.th", "resnet14")
    with pytest.raises(UserError, match=r"key 'linear.weight' .* is not a variable of resnet20 under torchvision"):
        convert.from_state_dict(state_dict, "torchvision", resnet20, "f.th", "resnet20")
    # DataParallel's prefix and akamaster's later `compressible_` names are the same keys.
    wrapped = {"state_dict": {"module." + k.replace("conv", "compressible_conv"): v for k, v in state_dict.items()}}
    assert list(convert.state_dict_of(wrapped, "f.th", "akamaster")) == list(state_dict)
    with pytest.raises(UserError, match=r"not a state dict: key 'epoch' holds a int"):
        convert.state_dict_of({"epoch": 3, "conv1.weight": np.zeros(1)}, "f.th", "akamaster")
    with pytest.raises(UserError, match=r"f.th is not a state dict \(it holds a list\)"):
        convert.state_dict_of([1, 2], "f.th", "akamaster")


# ---------------------------------------------------------------------------------------
# Reading torch's files without torch.


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_reads_both_torch_formats_without_torch(name):
    loaded = torch_files.load(os.path.join(FIXTURES, name))
    assert loaded["best_prec1"] == 91.5 and loaded["arch"] == "tiny" and loaded["sizes"] == [1, 2.5, (3, "x")]
    with np.load(os.path.join(FIXTURES, "tiny_expected.npz")) as expected:
        assert list(loaded["state_dict"]) == list(expected.keys())
        for key in expected.keys():
            got, want = loaded["state_dict"][key], expected[key]
            assert got.dtype == want.dtype and got.shape == want.shape, key
            np.testing.assert_array_equal(got, want, err_msg=key)
    # The views came back as views: a transposed matrix, a slice at an offset.
    np.testing.assert_array_equal(loaded["state_dict"]["transposed"], np.arange(24.0).reshape(4, 6).T)
    np.testing.assert_array_equal(loaded["state_dict"]["sliced"], np.arange(5.0, 11.0))
    assert "torch" not in sys.modules


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_files_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"state_dict": {"w": _RunsCode(marker)}}, protocol=2)
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        for header in (torch_files.LEGACY_MAGIC_NUMBER, torch_files.LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(payload)
    archive = tmp_path / "evil_zip.pth"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("evil_zip/data.pkl", payload)
    for path in (legacy, archive):
        with pytest.raises(UserError, match=r"names (posix|os)\.system, which is not part of a state dict"):
            torch_files.load(str(path))
    assert not marker.exists()
    # Neither torch file nor safetensors: one error too.
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(UserError, match="cannot read .*junk.pth as a PyTorch state dict"):
        torch_files.load(str(junk))


# ---------------------------------------------------------------------------------------
# Runs: import, export, fine-tuning.


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """akamaster ResNet-20 weights (seeded) in a .safetensors file, imported into a run."""
    tmp = tmp_path_factory.mktemp("convert")
    fixture = _fixture("akamaster_resnet20")
    source = str(tmp / "r20.safetensors")
    state_dict = _write_seeded(source, fixture["keys"])
    config = _config("--config=cifar:resnet20,smoke")
    workdir = str(tmp / "imported")
    convert.import_weights(source, "akamaster", config, workdir)
    return {"tmp": tmp, "source": source, "state_dict": state_dict, "workdir": workdir, "config": config}


def _restored(workdir, checkpoint="best"):
    """(config, variables, step) of a run's checkpoint, as numpy."""
    loaded = restore.load(workdir, checkpoint)
    return loaded.config, loaded.variables, loaded.step


def test_import_writes_a_step_0_run_and_round_trips_bitwise(imported):
    workdir, tmp = imported["workdir"], imported["tmp"]
    with open(os.path.join(workdir, "config.json")) as f:
        written = json.load(f)
    expected_config = imported["config"].copy_and_resolve_references()
    expected_config.data.normalization = "imagenet"

    assert written == json.loads(json.dumps(rundir.flatten(expected_config)))
    loaded = restore.load(workdir)
    config, variables, step = loaded.config, loaded.variables, loaded.step
    assert step == 0 and config.data.normalization == "imagenet"

    exported = str(tmp / "out.safetensors")
    assert convert.export_weights(workdir, exported)["format"] == "akamaster"
    state_dict = safetensors.numpy.load_file(exported)
    for key, value in imported["state_dict"].items():
        np.testing.assert_array_equal(state_dict[key], value, err_msg=key)  # 0 batches tracked both sides

    again = str(tmp / "again")
    convert.import_weights(exported, "akamaster", imported["config"], again)
    _, variables_again, _ = _restored(again)
    flat, flat_again = _flat(variables), _flat(variables_again)
    assert flat.keys() == flat_again.keys() and len(flat) == 116 - 19  # less the 19 BN counters
    for key in flat:
        assert flat[key].tobytes() == flat_again[key].tobytes(), key

    with pytest.raises(UserError, match="already holds a run"):
        convert.import_weights(exported, "akamaster", imported["config"], again)
    with pytest.raises(UserError, match="export writes .safetensors"):
        convert.export_weights(workdir, str(tmp / "out.pth"))


def test_export_says_when_best_falls_back_to_the_latest(imported, tmp_path, capsys):
    """An imported run has evaluated nothing: "best" is its latest checkpoint, and export says so."""
    done = convert.export_weights(imported["workdir"], str(tmp_path / "out.safetensors"))
    assert done["step"] == 0
    assert "note: no best step recorded (the run has not evaluated yet); using the latest checkpoint" in \
        capsys.readouterr().err


def test_load_initial_weights_keeps_what_fits(imported):
    config = _config("--config=cifar:resnet20,cifar100,smoke")
    rng = np.random.default_rng(1)  # stands for a fresh initialisation (no need to run one)
    fresh = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                         steps.abstract_variables(config, (16, 16, 3)))
    params, batch_stats, loaded, new = restore.load_initial_weights(imported["workdir"], fresh["params"],
                                                                    fresh["batch_stats"])
    assert sorted(new) == ["params/head/bias", "params/head/kernel"]
    assert len(loaded) == 97 - 2 and "batch_stats/stem_bn/var" in loaded
    _, source, _ = _restored(imported["workdir"])
    got, want, init = (_flat({"params": params, "batch_stats": batch_stats}), _flat(source),
                       _flat({"params": fresh["params"], "batch_stats": fresh["batch_stats"]}))
    for name in loaded:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in new:
        np.testing.assert_array_equal(got[name], init[name], err_msg=name)

    imagenet = models.create("resnet18", num_classes=5)
    other = _abstract(imagenet, (32, 32, 3))
    other = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), other)
    with pytest.raises(UserError, match="nothing in .* fits this model"):
        restore.load_initial_weights(imported["workdir"], other["params"], other["batch_stats"])
    with pytest.raises(UserError, match="is a file; convert it into a workdir first"):
        restore.load_initial_weights(imported["source"], fresh["params"], fresh["batch_stats"])


def test_training_continues_from_an_imported_run(imported, tmp_path):
    """The command line imports; `train_and_evaluate` (what resnet_jax.main runs) resumes from
    its step 0: at a learning rate of 1e-9 the parameters after two steps are the imported ones."""
    workdir = str(tmp_path / "run")
    args = ["--config=cifar:resnet20,smoke", "--config.train.total_steps=2", "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2", "--config.train.progress=False", "--config.optim.lr=1e-9"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "resnet_jax.convert", "import", "--format=akamaster",
                           f"--file={imported['source']}", f"--workdir={workdir}", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"imported 97 arrays of resnet20 from {imported['source']} (akamaster) into {workdir}" in done.stdout

    config = _config(*args, "--config.data.normalization=imagenet")
    train.train_and_evaluate(config, workdir)
    # The first evaluation logged is of the imported weights, at step 0, before any step.
    from resnet_jax import evaluate

    first = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[0]
    assert first["step"] == 0 and first["split"] == "test"
    report = evaluate.report(workdir, "test", 0, str(tmp_path / "report"))
    assert first["error"] == pytest.approx(report["error"], abs=1e-9)
    _, start, _ = _restored(imported["workdir"])
    _, after, step = _restored(workdir, "latest")
    assert step == 2
    start, after = _flat(start["params"]), _flat(after["params"])
    assert max(np.abs(after[k] - start[k]).max() for k in start) < 1e-6


def test_bad_files_are_one_error_line_and_nothing_written(imported, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for file, config, message in [
        (os.path.join(FIXTURES, "tiny_legacy.pth"), "cifar:resnet20",
         f"error: {FIXTURES}/tiny_legacy.pth: key 'conv' (shape (4, 3, 2, 2)) is not a variable of resnet20 "
         "under akamaster's names; check --config (model, data.num_classes) and --format"),
        (imported["source"], "cifar:resnet32",
         f"error: {imported['source']}: no key 'layer1.3.conv1.weight', which resnet32 needs (60 of its 157 "
         "variables are missing); check --config (model, data.num_classes) and --format"),
    ]:
        workdir = tmp_path / "never"
        done = subprocess.run([sys.executable, "-m", "resnet_jax.convert", "import", "--format=akamaster",
                               f"--file={file}", f"--config={config},synthetic", f"--workdir={workdir}"],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert done.returncode == 2 and done.stderr.splitlines() == [message], done.stderr
        assert done.stdout == "" and not workdir.exists()


# ---------------------------------------------------------------------------------------
# Files that lie about their sizes: refused before anything is allocated.


class _ForgedStorage:
    def __init__(self, type_name: str, key: str, numel: int):
        self.type_name, self.key, self.numel = type_name, key, numel


class _ForgedTensor:
    def __init__(self, storage: _ForgedStorage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, tuple(size), tuple(stride))


def _torch_pickle(obj) -> bytes:
    """`obj` pickled as torch.save pickles a state dict (protocol 2, torch's global names,
    storages as persistent ids), without torch: modules named torch and torch._utils stand in
    only while pickling, so pickle writes torch's names."""
    import collections
    import io
    import types

    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_types = {}
    for name in torch_files.STORAGE_DTYPES:
        storage_types[name] = type(name, (), {"__module__": "torch"})
        setattr(fake_torch, name, storage_types[name])

    class Pickler(pickle.Pickler):
        def persistent_id(self, value):
            if isinstance(value, _ForgedStorage):
                return ("storage", storage_types[value.type_name], value.key, "cpu", value.numel)
            return None

        def reducer_override(self, value):
            if isinstance(value, _ForgedTensor):
                return _rebuild_tensor_v2, (*value.args, False, collections.OrderedDict())
            return NotImplemented

    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": fake_torch, "torch._utils": fake_utils})
    try:
        out = io.BytesIO()
        Pickler(out, protocol=2).dump(obj)
        return out.getvalue()
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


def _forge_zip(path, state_dict: dict, records: dict[str, bytes]) -> None:
    """torch's zip layout: archive/data.pkl, archive/byteorder, archive/data/<key>, stored."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", _torch_pickle(state_dict))
        z.writestr("archive/byteorder", "little")
        for key, raw in records.items():
            z.writestr(f"archive/data/{key}", raw)


def _forge_legacy(path, state_dict: dict, storages: list[tuple[str, int, bytes | int]]) -> None:
    """torch's legacy layout: magic, protocol, system info, the object, the storage keys, then
    each storage's element count (int64) and its bytes (an int: that many zero bytes, sparse)."""
    import struct

    with open(path, "wb") as f:
        for header in (torch_files.LEGACY_MAGIC_NUMBER, torch_files.LEGACY_PROTOCOL_VERSION,
                       {"protocol_version": 1001, "little_endian": True,
                        "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        f.write(_torch_pickle(state_dict))
        pickle.dump([key for key, _, _ in storages], f, protocol=2)
        for key, numel, raw in storages:
            f.write(struct.pack("<q", numel))
            if isinstance(raw, int):
                f.seek(raw, os.SEEK_CUR)
            else:
                f.write(raw)
        f.truncate()


# A bound on the address space of the importing process: JAX itself takes about 2 GiB of it.
ADDRESS_SPACE_LIMIT = 4 << 30


def _import_under_memory_limit(file, tmp_path) -> subprocess.CompletedProcess:
    code = ("import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE_LIMIT}, {ADDRESS_SPACE_LIMIT})); "
            f"sys.argv = ['convert', 'import', '--format=akamaster', '--file={file}', "
            f"'--config=cifar:resnet20,synthetic', '--workdir={tmp_path / 'never'}']; "
            "runpy.run_module('resnet_jax.convert', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def _lying_files(tmp_path) -> list[tuple[str, str]]:
    """(file, what its one error line must say) for each lie."""
    one_float = _ForgedStorage("FloatStorage", "0", 1)
    zero_stride = tmp_path / "zero_stride.pth"  # one float seen as 2**36 of them: 256 GiB
    _forge_zip(zero_stride, {"conv1.weight": _ForgedTensor(one_float, 0, (2**36,), (0,))},
               {"0": np.float32(1).tobytes()})
    claims_a_terabyte = tmp_path / "claims_a_terabyte.pth"  # a storage of 2**40 floats in a 300-byte file
    huge = _ForgedStorage("FloatStorage", "0", 2**40)
    _forge_legacy(claims_a_terabyte, {"conv1.weight": _ForgedTensor(huge, 0, (16, 3, 3, 3), (27, 9, 3, 1))},
                  [("0", 2**40, b"\0" * 4)])
    # A truthful 8 GiB storage (a sparse file): more than resnet20's weights can take, refused unread.
    big = tmp_path / "big_storage.pth"
    _forge_legacy(big, {"conv1.weight": _ForgedTensor(_ForgedStorage("FloatStorage", "0", 2**31), 0,
                                                      (16, 3, 3, 3), (27, 9, 3, 1))}, [("0", 2**31, 2**33)])
    # A view past the end of its storage, and a legacy storage longer than the rest of the file.
    past_end = tmp_path / "past_end.pth"
    _forge_zip(past_end, {"conv1.weight": _ForgedTensor(_ForgedStorage("FloatStorage", "0", 432), 10,
                                                        (16, 3, 3, 3), (27, 9, 3, 1))},
               {"0": np.zeros(432, np.float32).tobytes()})
    short = tmp_path / "short.pth"
    _forge_legacy(short, {"conv1.weight": _ForgedTensor(_ForgedStorage("FloatStorage", "0", 2**26), 0,
                                                        (16, 3, 3, 3), (27, 9, 3, 1))}, [("0", 2**26, b"\0" * 64)])
    return [
        (str(zero_stride), r"key 'conv1\.weight' has shape \(68719476736,\), resnet20 needs \(16, 3, 3, 3\)"),
        (str(claims_a_terabyte), r"key 'conv1\.weight': its storage claims 4,398,046,511,104 bytes, the file "
                                 r"holds 4 after it"),
        (str(big), r"key 'conv1\.weight': its storage claims 8,589,934,592 bytes, more than the [\d,]+ bytes "
                   r"resnet20's state dict can take"),
        (str(past_end), r"key 'conv1\.weight' reaches element 441 of its storage, which holds 432"),
        (str(short), r"key 'conv1\.weight': its storage claims 268,435,456 bytes, the file holds 64 after"),
    ]


def test_lying_sizes_are_one_error_line_under_a_memory_limit(tmp_path):
    """Claims checked against the file's bytes and the model's shapes before allocation:
    under a 4 GiB address-space limit, each file is one `error:` line naming the key, exit 2."""
    for file, message in _lying_files(tmp_path):
        done = _import_under_memory_limit(file, tmp_path)
        lines = done.stderr.splitlines()
        assert done.returncode == 2 and len(lines) == 1, (file, done.returncode, done.stderr[-3000:])
        assert re.fullmatch(rf"error: (cannot read )?{re.escape(file)}[: ].*{message}.*", lines[0]), lines[0]
        assert not (tmp_path / "never").exists()


def test_reader_bounds_views_without_a_model(tmp_path):
    """Read alone (no target shapes), the lies are refused too: a view's elements may not
    exceed what the file holds (twice its size: bfloat16 is widened)."""
    files = _lying_files(tmp_path)
    expected = {files[0][0]: r"key 'conv1\.weight' views 68,719,476,736 elements \(274,877,906,944 bytes\): the "
                             r"arrays would take more than the [\d,]+ bytes that twice the file's size allows",
                **{file: message for file, message in files[1:] if "big_storage" not in file}}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for file, message in expected.items():
        code = ("import resource; "
                f"resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE_LIMIT}, {ADDRESS_SPACE_LIMIT})); "
                "from resnet_jax import torch_files\n"
                "try:\n"
                f"    torch_files.load({file!r})\n"
                "except torch_files.UserError as error:\n"
                "    print(error)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0 and re.search(message, done.stdout), (file, done.stdout, done.stderr[-2000:])


def test_forged_files_read_back_when_they_tell_the_truth(tmp_path):
    """The forger writes what the reader reads (so the refusals above are of lies, not of the forger)."""
    values = np.arange(432, dtype=np.float32)
    storage = _ForgedStorage("FloatStorage", "0", 432)
    state_dict = {"conv1.weight": _ForgedTensor(storage, 0, (16, 3, 3, 3), (27, 9, 3, 1)),
                  "row": _ForgedTensor(storage, 5, (3,), (2,))}
    _forge_zip(tmp_path / "z.pth", state_dict, {"0": values.tobytes()})
    _forge_legacy(tmp_path / "l.pth", state_dict, [("0", 432, values.tobytes())])
    for name in ("z.pth", "l.pth"):
        loaded = torch_files.load(str(tmp_path / name))
        np.testing.assert_array_equal(loaded["conv1.weight"], values.reshape(16, 3, 3, 3))
        np.testing.assert_array_equal(loaded["row"], [5, 7, 9])
    assert "torch" not in sys.modules
