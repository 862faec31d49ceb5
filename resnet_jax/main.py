"""Trains (or resumes) one run: a config recipe, a workdir.

    python -m resnet_jax.main --config=cifar:resnet56 --workdir=runs/r56
    resnet-jax train --config=cifar:resnet56 --workdir=runs/r56          # the same

--config is a recipe name with its variant (cifar:resnet56, cifar:plain20,cifar100,
imagenet:resnet50, digits; `resnet-jax configs` lists them) or a file path
(configs/cifar.py:resnet56). Any config field can be overridden: --config.train.total_steps=1000.
Running the same command again resumes from the workdir's latest checkpoint. Multi-host:
--coordinator=HOST:PORT --num_processes=N --process_id=I, or --distributed under SLURM / on a
TPU pod, where JAX finds its peers itself.
"""

import ast
import importlib
import importlib.util
import os
import pkgutil
import sys

import jax
from absl import flags
from ml_collections import config_flags

from resnet_jax import cli as cli_lib
from resnet_jax import convert, evaluate, train
from resnet_jax.errors import UserError

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Recipe and variant (cifar:resnet56) or file (configs/cifar.py:resnet56).",
                                flag_values=FLAGS, lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, TensorBoard events and figures go.", flag_values=FLAGS)
flags.DEFINE_string("coordinator", None, "Multi-host: address HOST:PORT of process 0.", flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", flag_values=FLAGS)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with what JAX detects (SLURM, TPU pod).",
                  flag_values=FLAGS)

COMMANDS = {
    "train": "train or resume one run (the default when the flags come first)",
    "evaluate": "a trained workdir -> report/: metrics, confusion matrix, mistakes, curves",
    "configs": "list the config recipes and their variants",
    "convert": "pretrained weights in and out of a workdir (torchvision, akamaster's CIFAR ResNets)",
}


def initialize_distributed() -> None:
    if FLAGS.coordinator or FLAGS.num_processes:
        if not (FLAGS.coordinator and FLAGS.num_processes and FLAGS.process_id is not None):
            raise UserError("multi-host needs --coordinator, --num_processes and --process_id together")
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv=None) -> None:
    """Parses flags (help: exit 0; user errors: one line, exit 2) and trains."""
    with cli_lib.errors_exit():
        cli_lib.parse_flags(FLAGS, argv, __doc__)
        if FLAGS.config is None:
            raise UserError("--config is required, e.g. --config=cifar:resnet56")
        if FLAGS.workdir is None:
            raise UserError("--workdir is required")
        initialize_distributed()
        train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir))


EXPERIMENTS_PACKAGE = "resnet_jax.experiments"  # experiments/ in the repository


def experiments() -> dict[str, str]:
    """The experiments a `resnet-jax` sub-command runs: every module of resnet_jax.experiments
    that is a program (it has a `__main__` block and a `main(argv)`), name -> the first line of
    its docstring. Found by reading the files, without importing them (they import JAX)."""
    try:
        spec = importlib.util.find_spec(EXPERIMENTS_PACKAGE)
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return {}
    found = {}
    for module in sorted(pkgutil.iter_modules(spec.submodule_search_locations), key=lambda m: m.name):
        path = os.path.join(module.module_finder.path, module.name + ".py")
        if module.ispkg or module.name.startswith("_") or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_program = any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)
        has_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
        if is_program and has_main:
            found[module.name] = " ".join((ast.get_docstring(tree) or "").strip().split("\n\n")[0].split())
    return found


def usage() -> str:
    """What `resnet-jax` alone prints: its sub-commands, then the experiments'."""
    found = experiments()
    width = max(map(len, [*COMMANDS, *found]))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    more = [f"  {name:<{width}}  {what}" for name, what in found.items()]
    return ("usage: resnet-jax COMMAND [flags]   (`resnet-jax COMMAND --help` for its flags)\n\ncommands:\n"
            + "\n".join(lines) + ("\n\nexperiments:\n" + "\n".join(more) if more else "")
            + "\n\nexample: resnet-jax train --config=cifar:resnet20 --workdir=runs/r20\n")


def cli() -> None:
    """The `resnet-jax` console script: `resnet-jax COMMAND ...`: train (the default when flags
    come first), evaluate, configs, convert, or an experiment (degradation, skip_ablation, ...)."""
    args = sys.argv[1:]
    if not args:
        cli_lib.show(usage())
        sys.exit(0)
    if args[0] in cli_lib.HELP + cli_lib.HELPFULL:
        cli_lib.show(usage() + "\n")
        main([sys.argv[0], *args])
    command = args.pop(0) if not args[0].startswith("-") else "train"
    program = f"{sys.argv[0]} {command}"
    if command == "train":
        return main([program, *args])
    if command == "evaluate":
        return evaluate.main([program, *args])
    if command == "configs":
        print(cli_lib.describe_configs())
        return
    if command == "convert":
        return convert.main([program, *args])
    found = experiments()
    if command.replace("-", "_") in found:
        module = importlib.import_module(f"{EXPERIMENTS_PACKAGE}.{command.replace('-', '_')}")
        return module.main([program, *args])
    known = list(COMMANDS) + list(found)
    cli_lib.fail(f"unknown command {command!r}; use {', '.join(known)}")


if __name__ == "__main__":
    main()
