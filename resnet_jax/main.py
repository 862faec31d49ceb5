"""Entry point: `python -m resnet_jax.main --config=configs/cifar.py:resnet56 --workdir=DIR`.

Only parses flags and calls `train_and_evaluate`. Any config field can be overridden:
`--config.train.total_steps=1000`. Multi-host: `--coordinator=HOST:PORT --num_processes=N
--process_id=I`, or nothing under SLURM / on a TPU pod, where JAX finds its peers itself.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax.errors import NONFINITE_EXIT, PREEMPTED_EXIT, USER_ERROR_EXIT, UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar.py:resnet56.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and figures go.")
flags.DEFINE_string("coordinator", None, "Multi-host: address HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with what JAX detects (SLURM, TPU pod).")


def fail(message: str, code: int = USER_ERROR_EXIT) -> None:
    """One line on stderr and exit. os._exit: interpreter shutdown would let libraries' leftover
    threads (Orbax, TensorStore after a failed restore) print their own noise after it."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def initialize_distributed() -> None:
    import jax

    if FLAGS.coordinator or FLAGS.num_processes:
        if not (FLAGS.coordinator and FLAGS.num_processes and FLAGS.process_id is not None):
            raise UserError("multi-host needs --coordinator, --num_processes and --process_id together")
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def run(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.workdir is None:
        raise UserError("--workdir is required")
    initialize_distributed()
    from resnet_jax import train

    try:
        train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir))
    except train.Preempted as stopped:
        fail(str(stopped), PREEMPTED_EXIT)
    except train.NonFinite as stopped:
        fail(str(stopped), NONFINITE_EXIT)


def _load_error(error: Exception) -> str:
    """ml_collections wraps a config file's own error in lines of context: keep its cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    if last.startswith("\"'") and last.endswith("'\""):  # a KeyError from --config.x.y=...
        return f"no config field {last[1:-1]} (the fields are in resnet_jax/config.py)"
    return last


def main(argv=None) -> None:
    """Parses flags (user errors -> one line, exit 2) and trains."""
    argv = list(sys.argv if argv is None else argv)
    try:
        rest = FLAGS(argv)
        if FLAGS["config"].value is None:
            fail("--config is required, e.g. --config=configs/cifar.py:resnet56")
        FLAGS.config.parallel  # config files load lazily: touch it so a bad one fails here
    except Exception as error:  # flags, or a config file or variant that does not load
        fail(f"bad flags: {_load_error(error)}")
    try:
        run(rest)
    except UserError as error:
        fail(str(error))


def cli() -> None:
    """`resnet-jax train ...` (the same flags) and `resnet-jax evaluate ...`."""
    args = sys.argv[1:]
    command = args.pop(0) if args and not args[0].startswith("-") else "train"
    if command == "evaluate":
        from resnet_jax import evaluate

        return evaluate.main([sys.argv[0]] + args)
    if command != "train":
        fail(f"unknown command {command!r}; use train or evaluate")
    main([sys.argv[0]] + args)


if __name__ == "__main__":
    main()
