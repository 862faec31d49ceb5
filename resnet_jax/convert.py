"""Pretrained weights in and out: torchvision's ImageNet ResNets and akamaster's CIFAR ResNets.

    python -m resnet_jax.convert import --format=akamaster --file=resnet56-4bfd9763.th \\
        --config=cifar:resnet56 --workdir=runs/ak56
    python -m resnet_jax.evaluate --workdir=runs/ak56
    python -m resnet_jax.convert export --workdir=runs/ak56 --file=ak56.safetensors

`import` reads a state dict (torch's zip or legacy `.pth`/`.th` file, or `.safetensors`;
no code from the file runs and torch is not needed: resnet_jax.torch_files) under
torchvision's names (`--format=torchvision`: conv1, bn1, layer1.0.conv1, ..., fc) or
akamaster/pytorch_resnet_cifar10's (`--format=akamaster`: the same with `linear`, option-A
shortcuts, keys under `module.`), and writes DIR as a run at step 0: config.json and an
Orbax checkpoint of params, BN statistics and a fresh optimiser state. So
`python -m resnet_jax.evaluate --workdir=DIR` evaluates it, `python -m resnet_jax.main
--config=SAME --workdir=DIR` goes on training it, and `--config.train.init_from=DIR` starts
another run (another number of classes, say) from it. The preprocessing the weights were
trained with is part of the import: both formats scale pixels to [0, 1] and normalise with
ImageNet's per-channel mean and std (`data.normalization=imagenet`), which config.json says.
Anything that does not fit (not a state dict, a key or a shape the model lacks) is one
`error:` line naming the first such key, exit 2, and nothing is written.

`export` writes a run's params and BN statistics (its best checkpoint, else its latest) as
`.safetensors` under torchvision's names (ImageNet nets) or akamaster's (CIFAR nets), so
`torchvision.models.resnet50().load_state_dict(safetensors.torch.load_file(OUT))` works.
`--weights=ema` writes the run's weight EMA (train.ema_decay) instead of its raw weights.

Fine-tuning note: flax's BatchNorm updates the running variance with the biased batch
variance, torch's with the unbiased one (larger by n/(n-1), n = batch x height x width).
Imported statistics are used as they are; only statistics gathered while training here
differ from what torch would have gathered, and by that factor alone.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from absl import flags
from flax import traverse_util
from ml_collections import config_flags

from resnet_jax import cli, models, restore, rundir, steps, torch_files
from resnet_jax import config as config_lib
from resnet_jax.checkpoint import Checkpoints
from resnet_jax.data import IMAGENET_MEAN, IMAGENET_STD
from resnet_jax.errors import UserError

# What each --format holds: its model family and its names for the modules that differ.
FORMATS = {
    "torchvision": {"family": "imagenet", "head": "fc", "projection": "downsample",
                    "models": "torchvision.models.resnet18 ... resnet152"},
    "akamaster": {"family": "cifar", "head": "linear", "projection": "shortcut",
                  "models": "akamaster/pytorch_resnet_cifar10 resnet20 ... resnet1202"},
}
FORMAT_OF_FAMILY = {spec["family"]: name for name, spec in FORMATS.items()}
# flax leaf -> torch leaf
LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
BN_COUNTER = "num_batches_tracked"  # torch's BN buffer; no flax counterpart, not needed (momentum is set)

IMPORT = flags.FlagValues()
flags.DEFINE_enum("format", None, list(FORMATS), "Whose names the file uses: torchvision or akamaster.",
                  flag_values=IMPORT)
flags.DEFINE_string("file", None, "The weights: a .pth/.th (torch.save) or .safetensors file.", flag_values=IMPORT)
config_flags.DEFINE_config_file("config", None, "Recipe and variant of the model the weights are for "
                                "(cifar:resnet56, imagenet:resnet50) or a file (configs/cifar.py:resnet56).",
                                flag_values=IMPORT, lock_config=True)
flags.DEFINE_string("workdir", None, "The run to write (config.json and a checkpoint at step 0); must not hold "
                    "a run unless --config.overwrite=True.", flag_values=IMPORT)

EXPORT = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The run whose weights to write.", flag_values=EXPORT)
flags.DEFINE_string("file", None, "Where to write them: OUT.safetensors.", flag_values=EXPORT)
flags.DEFINE_string("checkpoint", "best", "best (else the latest), latest, or a step number.", flag_values=EXPORT)
flags.DEFINE_string("weights", "raw", "raw, or ema: the run's weight EMA (train.ema_decay > 0).", flag_values=EXPORT)


# ---------------------------------------------------------------------------------------
# Names and layouts: flax variable paths <-> torch state-dict keys.


def torch_key(collection: str, path: tuple[str, ...], fmt: str) -> str:
    """The torch key of one flax variable, e.g. ("params", ("stage2_block1", "proj_conv",
    "kernel")) -> "layer2.0.downsample.0.weight" (torchvision)."""
    del collection  # BN's scale/bias are params, its mean/var batch_stats; the leaf names differ
    return ".".join([*_torch_module(path[:-1], fmt), LEAVES[path[-1]]])


def _torch_module(modules: tuple[str, ...], fmt: str) -> list[str]:
    names = FORMATS[fmt]
    out = []
    for name in modules:
        if name == "stem_conv":
            out.append("conv1")
        elif name == "stem_bn":
            out.append("bn1")
        elif name == "head":
            out.append(names["head"])
        elif name.startswith("stage"):  # stage{s}_block{b} -> layer{s}.{b-1}
            stage, block = name[len("stage"):].split("_block")
            out += [f"layer{stage}", str(int(block) - 1)]
        elif name == "proj_conv":
            out += [names["projection"], "0"]
        elif name == "proj_bn":
            out += [names["projection"], "1"]
        else:  # conv1..3, bn1..3: the same in torch
            out.append(name)
    return out


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """flax conv kernel (kh, kw, in, out) -> torch (out, in, kh, kw); dense (in, out) -> (out, in)."""
    if array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    return array.T if array.ndim == 2 else array


def to_flax_layout(array: np.ndarray) -> np.ndarray:
    """The inverse of `to_torch_layout`."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    return array.T if array.ndim == 2 else array


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return to_torch_layout(np.empty(shape, np.bool_)).shape


def layout(variables: dict, fmt: str) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """torch key -> (flax collection, path, flax shape) for every variable of a model.

    Args:
      variables: {"params": ..., "batch_stats": ...} of arrays or ShapeDtypeStructs.
    """
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(variables[collection]).items():
            out[torch_key(collection, path, fmt)] = (collection, path, tuple(leaf.shape))
    return out


def bn_counters(variables: dict, fmt: str) -> list[str]:
    """torch's `num_batches_tracked` key of every BN layer."""
    return sorted({key.rsplit(".", 1)[0] + "." + BN_COUNTER for key in layout(variables, fmt)
                   if key.endswith(".running_mean")})


# ---------------------------------------------------------------------------------------
# State dicts <-> variables.


def state_dict_of(obj: Any, path: str, fmt: str) -> dict[str, np.ndarray]:
    """The state dict in what `torch_files.load` returned: the object itself, or what it
    holds under "state_dict" (akamaster's checkpoints) or "model"; DataParallel's `module.`
    prefix and akamaster's later `compressible_` prefix dropped.

    Raises:
      UserError: not a dict of tensors.
    """
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} is not a state dict (it holds {_describe(obj)}); save model.state_dict()")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, (np.ndarray, torch_files.Tensor)):
            raise UserError(f"{path} is not a state dict: key {key!r} holds {_describe(value)}, not a tensor")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        keys = [k[len("module."):] for k in keys]
    if fmt == "akamaster":
        keys = [".".join(part.removeprefix("compressible_") for part in k.split(".")) for k in keys]
    return dict(zip(keys, obj.values()))


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a dict of {len(obj)} entries" + (f" ({', '.join(map(repr, list(obj)[:4]))}, ...)" if obj else "")
    if isinstance(obj, (np.ndarray, torch_files.Tensor)):
        return f"a tensor of shape {obj.shape}"
    return f"a {type(obj).__name__}"


def from_state_dict(state_dict: dict[str, np.ndarray], fmt: str, abstract: dict, path: str,
                    model: str) -> tuple[dict, dict]:
    """(params, batch_stats) of the model `abstract` describes, from a torch state dict.

    Args:
      state_dict: torch key -> array (or torch_files.Tensor, whose elements are read only
        once its shape is the model's), in the file's order (see `state_dict_of`).
      fmt: "torchvision" or "akamaster".
      abstract: the model's {"params", "batch_stats"} (shapes are what matters).
      path, model: for the messages.

    Raises:
      UserError: naming the first key (in the file's order) the model has no place for or
        whose shape differs, or else the first key the model needs that the file lacks.
    """
    expected = layout(abstract, fmt)
    counters = set(bn_counters(abstract, fmt))
    hint = "check --config (model, data.num_classes) and --format"
    flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        if key in counters:
            continue
        if key not in expected:
            raise UserError(f"{path}: key {key!r} (shape {value.shape}) is not a variable of {model} under "
                            f"{fmt}'s names; {hint}")
        collection, flax_path, shape = expected[key]
        if value.shape != torch_shape(shape):
            raise UserError(f"{path}: key {key!r} has shape {value.shape}, {model} needs {torch_shape(shape)}; {hint}")
        if not np.issubdtype(value.dtype, np.floating):
            raise UserError(f"{path}: key {key!r} holds {value.dtype}, not floating-point weights")
        flat[collection][flax_path] = np.ascontiguousarray(to_flax_layout(np.asarray(value)), dtype=np.float32)
    missing = sorted((key for key in expected if key not in state_dict), key=_torch_order)
    if missing:
        raise UserError(f"{path}: no key {missing[0]!r}, which {model} needs ({len(missing)} of its "
                        f"{len(expected)} variables are missing); {hint}")
    return traverse_util.unflatten_dict(flat["params"]), traverse_util.unflatten_dict(flat["batch_stats"])


def state_bytes_bound(abstract: dict, fmt: str) -> int:
    """The most a torch state dict of the model `abstract` describes can take: every variable
    as float64 and every BN counter (int64)."""
    elements = sum(int(np.prod(shape)) for _, _, shape in layout(abstract, fmt).values())
    return 8 * (elements + len(bn_counters(abstract, fmt)))


def to_state_dict(params: Any, batch_stats: Any, fmt: str, batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """torch's state dict (C-contiguous numpy arrays) of a model's variables, in torch's order.

    Args:
      batches_tracked: the value of every BN layer's `num_batches_tracked` (torch's strict
        `load_state_dict` wants the key; with a momentum set, torch does not use it).
    """
    variables = {"params": params, "batch_stats": batch_stats}
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(variables[collection]).items():
            out[torch_key(collection, path, fmt)] = np.ascontiguousarray(to_torch_layout(np.asarray(leaf)))
    for key in bn_counters(variables, fmt):
        out[key] = np.asarray(batches_tracked, np.int64)
    return dict(sorted(out.items(), key=lambda item: _torch_order(item[0])))


def _torch_order(key: str) -> tuple:
    """Sort key giving torch's order, that of the modules' definition: conv1, bn1, layer1.0
    (conv1, bn1, conv2, bn2, ..., downsample), ..., layer1.10, ..., fc."""

    def rank(part: str) -> tuple[int, int]:
        if part.isdigit():
            return (0, int(part))
        if part.startswith(("conv", "bn")):  # convK before bnK before conv(K+1)
            return (int(part.lstrip("convbn")), 0 if part.startswith("conv") else 1)
        if part.startswith("layer"):
            return (100, int(part[len("layer"):]))
        return (200, 0) if part in ("downsample", "shortcut") else (300, 0)  # the projection, the head

    *modules, leaf = key.split(".")
    return ([rank(part) for part in modules], ("weight", "bias", "running_mean", "running_var", BN_COUNTER).index(leaf))


# ---------------------------------------------------------------------------------------
# Runs.


def _family(config) -> str:
    try:
        return config.model.family or models.model_family(config.model.name)
    except ValueError as error:
        raise UserError(str(error)) from None


def import_weights(file: str, fmt: str, config, workdir: str) -> dict:
    """Writes `workdir` as a run at step 0 holding the weights in `file`.

    Args:
      file: a torch.save file (zip or legacy) or .safetensors holding a state dict.
      fmt: "torchvision" or "akamaster".
      config: the run's config (its model must be the one the weights are for);
        data.normalization is set to the preprocessing the weights were trained with.
      workdir: must not hold a run, unless config.overwrite.

    Returns:
      {"workdir", "model", "variables" (count), "sha256" (of the file)}.

    Raises:
      UserError: before anything is written.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    config = config.copy_and_resolve_references()
    # Both formats were trained on pixels / 255 normalised with ImageNet's mean and std.
    config.data.normalization = "imagenet"
    config_lib.validate(config, jax.device_count())
    family, model = _family(config), config.model.name
    if family != FORMATS[fmt]["family"]:
        kind = {"cifar": "CIFAR", "imagenet": "ImageNet"}
        raise UserError(f"--format={fmt} holds {kind[FORMATS[fmt]['family']]} nets ({FORMATS[fmt]['models']}), "
                        f"but {model} is {'an' if family == 'imagenet' else 'a'} {kind[family]} net; use "
                        f"--format={FORMAT_OF_FAMILY[family]} or another --config")

    image_shape = restore.default_image_shape(config)  # torch's ResNets take RGB
    abstract = steps.abstract_variables(config, image_shape)
    # Nothing beyond what the model can hold is allocated: the storages are bound by its
    # state's size, and each tensor is read only once its shape is the model's.
    loaded = torch_files.load(file, max_bytes=state_bytes_bound(abstract, fmt),
                              what=f"{model}'s state dict can take (as float64)", materialize=False)
    state_dict = state_dict_of(loaded, file, fmt)
    params, batch_stats = from_state_dict(state_dict, fmt, abstract, file, model)

    config_path = os.path.join(workdir, "config.json")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if not config.overwrite and (os.path.exists(config_path) or (os.path.isdir(checkpoint_dir)
                                                                  and os.listdir(checkpoint_dir))):
        raise UserError(f"{workdir} already holds a run; use a new workdir or --config.overwrite=True to replace it")

    state = restore.new_state(config, params, batch_stats)
    with open(file, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    meta = rundir.RunMeta(step=0, image_shape=list(image_shape),
                          normalization={"mean": np.asarray(IMAGENET_MEAN, np.float32).tolist(),
                                         "std": np.asarray(IMAGENET_STD, np.float32).tolist()},
                          imported_from={"file": os.path.abspath(file), "format": fmt, "sha256": sha256})
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    lock = rundir.prepare(config, workdir, state_bytes)
    try:
        checkpoints = Checkpoints(workdir, config.train.keep_checkpoints)
        try:
            checkpoints.save(0, state, meta.to_json())
        finally:
            checkpoints.close()
    finally:
        lock.release()
    count = len(jax.tree.leaves((params, batch_stats)))
    return {"workdir": workdir, "model": model, "variables": count, "sha256": sha256}


def export_weights(workdir: str, file: str, checkpoint: str | int = "best", weights: str = "raw") -> dict:
    """Writes a run's params and BN statistics to `file` (.safetensors) under torch's names.

    Args:
      weights: "raw", or "ema": the run's weight EMA (params and BN statistics).

    Returns:
      {"file", "format", "step", "tensors", "weights"}.

    Raises:
      UserError: no run or checkpoint; a file name that is not .safetensors; ema weights
        of a run without them.
    """
    if not file.endswith(".safetensors"):
        raise UserError(f"export writes .safetensors; name the file like OUT.safetensors, not {file!r}")
    run = restore.load(workdir, checkpoint, weights=weights)  # says when "best" falls back
    fmt = FORMAT_OF_FAMILY[_family(run.config)]
    state_dict = to_state_dict(run.variables["params"], run.variables["batch_stats"], fmt,
                               batches_tracked=run.step)
    partial = f"{file}.partial"
    try:
        safetensors.numpy.save_file(state_dict, partial, metadata={"format": "pt"})
        os.replace(partial, file)  # a complete file or none
    except OSError as error:
        raise UserError(f"cannot write {file}: {error.strerror or error}") from None
    return {"file": file, "format": fmt, "step": run.step, "tensors": len(state_dict), "weights": weights}


# ---------------------------------------------------------------------------------------
# Command line.

COMMANDS = {"import": IMPORT, "export": EXPORT}


def _help() -> str:
    parts = [__doc__.strip(), ""]
    for name, flag_values in COMMANDS.items():
        parts += [f"{name} " + cli.help_text(flag_values, "").strip(), ""]  # "import flags:\n ..."
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    """`python -m resnet_jax.convert import|export --flag=...` (`--help` for the flags)."""
    argv = list(sys.argv if argv is None else argv)
    program, args = argv[0], argv[1:]
    with cli.errors_exit():
        if args and args[0] in cli.HELP + cli.HELPFULL:
            print(_help(), flush=True)
            sys.exit(0)
        if not args:
            raise UserError("name a command: import or export (--help shows what they do and their flags)")
        command = args.pop(0)
        if command not in COMMANDS:
            raise UserError(f"unknown command {command!r}; use import or export (--help for their flags)")
        flag_values = COMMANDS[command]
        cli.parse_flags(flag_values, [f"{program} {command}", *args], __doc__)
        required = ("format", "file", "config", "workdir") if command == "import" else ("workdir", "file")
        for name in required:
            if flag_values[name].value is None:
                raise UserError(f"--{name} is required (python -m resnet_jax.convert --help shows an example)")
        if command == "import":
            _check_normalization_override(args)
            done = import_weights(os.path.expanduser(flag_values.file), flag_values.format, flag_values.config,
                                  os.path.expanduser(flag_values.workdir))
            print(f"imported {done['variables']} arrays of {done['model']} from {flag_values.file} "
                  f"({flag_values.format}) into {done['workdir']} at step 0 (data.normalization=imagenet); "
                  f"evaluate: python -m resnet_jax.evaluate --workdir={done['workdir']}", flush=True)
            if flag_values.config.model.dtype != "float32":
                print(f"note: model.dtype={flag_values.config.model.dtype} (the recipe's) computes in lower precision "
                      "than torch: add --config.model.dtype=float32 for torch's logits to about 1e-6", flush=True)
        else:
            done = export_weights(os.path.expanduser(flag_values.workdir), os.path.expanduser(flag_values.file),
                                  flag_values.checkpoint, flag_values.weights)
            what = "the weight EMA's " if done["weights"] == "ema" else ""
            print(f"exported {what}{done['tensors']} tensors of step {done['step']} under {done['format']}'s names "
                  f"to {done['file']}", flush=True)


def _check_normalization_override(args: list[str]) -> None:
    """The weights fix the preprocessing: refuse --config.data.normalization=anything else."""
    for arg in args:
        if arg.startswith("--config.data.normalization="):
            value = arg.split("=", 1)[1]
            if value != "imagenet":
                raise UserError(f"--config.data.normalization={value}: these weights were trained on ImageNet-"
                                "normalised inputs, which the import sets (data.normalization=imagenet)")


if __name__ == "__main__":
    main()
