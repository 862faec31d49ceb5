"""What every command line here shares: absl flags, `--help`, config names, one error line.

Every entry point (resnet_jax.main, resnet_jax.evaluate, the experiments) keeps its flags in
a `flags.FlagValues()` of its own (so several can be imported in one process) and does

    argv = cli.parse_flags(FLAGS, argv, __doc__)   # -h/--help/--helpfull: print, exit 0
    with cli.errors_exit():                        # UserError: `error: ...`, exit 2
        run(argv)

`--help` prints the module docstring (what the program does and an example command) and the
program's own flags. Config flags accept recipe names (`cifar:resnet56`, `imagenet:resnet50`,
`digits`) that resolve to the installed `resnet_jax.configs` package (the repository's
`configs/`) from any directory, beside file paths.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from absl import flags

from ml_collections import config_flags

from resnet_jax.errors import NONFINITE_EXIT, PREEMPTED_EXIT, USER_ERROR_EXIT, NonFinite, Preempted, UserError

HELP = ("-h", "-help", "--help", "-helpshort", "--helpshort", "-?")
HELPFULL = ("-helpfull", "--helpfull")


def fail(message: str, code: int = USER_ERROR_EXIT) -> NoReturn:
    """One `error:` line on stderr and exit with `code`.

    os._exit: interpreter shutdown would let libraries' leftover threads (Orbax, TensorStore
    after a failed restore) print their own noise after the line.
    """
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


@contextlib.contextmanager
def errors_exit() -> Iterator[None]:
    """Turns what a user can act on into one line and its exit code: UserError (2), a
    preempted run (3, the same command resumes), a non-finite loss (4), Ctrl-C (3)."""
    try:
        yield
    except UserError as error:
        fail(str(error))
    except Preempted as error:
        fail(str(error), PREEMPTED_EXIT)
    except NonFinite as error:
        fail(str(error), NONFINITE_EXIT)
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume", PREEMPTED_EXIT)


# ---------------------------------------------------------------------------------------
# Flags and help.


def help_text(flag_values: flags.FlagValues, doc: str, full: bool = False) -> str:
    """The module docstring, then the program's flags (`full`: with absl's own, --flagfile
    and --undefok, which every program accepts)."""
    rendered = flag_values.get_help(include_special_flags=full).splitlines()
    # absl heads each group with the defining module's file name; with one FlagValues per
    # program only the special flags' group is worth a heading.
    lines = [line for line in rendered if line.startswith(" ") or line == "absl.flags:" or not line]
    body = "\n".join(lines).strip("\n")
    return f"{doc.strip()}\n\nflags:\n{body}\n"


def show(text: str) -> None:
    """Prints help or usage text; a reader that stops early (`--help | head`) ends the
    program quietly instead of with a BrokenPipeError traceback."""
    try:
        print(text, end="", flush=True)
    except BrokenPipeError:
        os._exit(0)


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str] | None, doc: str) -> list[str]:
    """Parses `argv` (sys.argv by default) into `flag_values`; handles help and config names.

    `-h`/`--help` prints `help_text` and exits 0 (`--helpfull` adds absl's special flags).
    `--config=NAME[:VARIANT]` with a recipe name is resolved to the installed file first.

    Returns:
      The arguments left over (the program name first).

    Raises:
      UserError: an unknown flag, a bad value, extra arguments, or a config file that does
        not load, as one line (use `errors_exit` or `fail` to print it).
    """
    argv = list(sys.argv if argv is None else argv)
    options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(arg in HELP + HELPFULL for arg in options):
        show(help_text(flag_values, doc, full=any(arg in HELPFULL for arg in options)))
        sys.exit(0)
    argv = resolve_config_args(argv)
    flag_values.unparse_flags()  # a second call in one process starts from the defaults again
    # ml_collections reads `--config.x=y` overrides from sys.argv rather than from the list
    # parsed: make them the same for the call.
    saved, sys.argv = sys.argv, argv
    try:
        rest = flag_values(argv)
        for name in flag_values:  # config files load lazily: touch each so a bad one fails here
            value = flag_values[name].value
            if _is_config_flag(flag_values[name]) and value is not None:
                getattr(value, "keys")
    except UserError:
        raise
    except Exception as error:  # absl's flag errors, or a config file that does not load
        raise UserError(f"bad flags: {_flag_error(error)}") from None
    finally:
        sys.argv = saved
    flags.FLAGS.mark_as_parsed()  # absl logging (Orbax logs through it) then stays quiet
    if len(rest) > 1:
        raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")
    return rest


def _is_config_flag(flag: flags.Flag) -> bool:
    return flag.flag_type() == "config object"  # ml_collections' config file and dict flags


def _flag_error(error: Exception) -> str:
    """absl and ml_collections wrap the cause in lines of context: keep the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    if last.startswith("\"'") and last.endswith("'\""):  # a KeyError from --config.x.y=...
        return f"no config field {last[1:-1]} (the fields are in resnet_jax/config.py)"
    for prefix in ("ValueError: ", "TypeError: "):  # a config file's own error, from its traceback
        last = last.removeprefix(prefix)
    return last


# ---------------------------------------------------------------------------------------
# Config names.


CONFIGS_PACKAGE = "resnet_jax.configs"  # configs/ in the repository, installed inside the package


def config_dir() -> str:
    """The installed recipes' folder (resnet_jax.configs)."""
    return os.path.dirname(importlib.import_module(CONFIGS_PACKAGE).__file__)


def recipe_names() -> list[str]:
    return sorted(name[:-3] for name in os.listdir(config_dir()) if name.endswith(".py") and not name.startswith("_"))


def resolve_config(spec: str) -> str:
    """A config flag's value, with recipe names resolved to the installed files.

    "cifar:resnet56" -> ".../configs/cifar.py:resnet56"; "digits" -> ".../configs/digits.py";
    an existing file path is kept; "configs/cifar.py" that does not exist here (another
    working directory) is the installed file of that name.

    Raises:
      UserError: neither a file nor a recipe name.
    """
    path, sep, variant = spec.partition(":")
    if os.path.isfile(path):
        return spec
    name = path
    if name.endswith(".py") and os.path.basename(os.path.dirname(name)) == "configs":
        name = os.path.basename(name)[:-3]
    if name in recipe_names():
        return os.path.join(config_dir(), name + ".py") + sep + variant
    raise UserError(f"No such file or directory: {path!r}; a config is a file (configs/cifar.py:resnet56) or a "
                    f"recipe name: {', '.join(recipe_names())} (`resnet-jax configs` lists them)")


def resolve_config_args(argv: Sequence[str], name: str = "config") -> list[str]:
    """`argv` with the value of --NAME (`--config=X` or `--config X`) resolved."""
    argv, out = list(argv), []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            return out + argv[index:]
        for dashes in ("--", "-"):
            if arg.startswith(f"{dashes}{name}="):
                arg = f"{dashes}{name}={resolve_config(arg.split('=', 1)[1])}"
            elif arg == f"{dashes}{name}" and index + 1 < len(argv):
                out.append(arg)
                index += 1
                arg = resolve_config(argv[index])
        out.append(arg)
        index += 1
    return out


def config_from_args(args: Sequence[str]):
    """The ConfigDict that `python -m resnet_jax.main ARGS` trains: the same parsing, the
    same overrides, so an experiment that builds its runs here runs exactly its printed
    commands.

    Args:
      args: `--config=...` and `--config.x=y` flags (others are ignored).

    Raises:
      UserError: as `parse_flags`.
    """
    argv = ["resnet_jax.main", *(a for a in args if a.startswith(("--config=", "--config.")))]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
    parse_flags(flag_values, argv, "")
    return flag_values.config


def describe_configs() -> str:
    """`resnet-jax configs`: each recipe's one-line description, command and variants."""
    out = []
    for name in recipe_names():
        module = importlib.import_module(f"{CONFIGS_PACKAGE}.{name}")
        doc = (module.__doc__ or "").strip().splitlines()
        command = next((line.strip() for line in doc if line.strip().startswith("python -m")), "")
        out += [f"{name}: {doc[0] if doc else ''}"]
        out += [f"    {command}"] if command else []
        variants = getattr(module, "VARIANTS", {})
        width = max(map(len, variants), default=0)
        out += [f"    {token:<{width}}  {description}" for token, description in variants.items()]
        out.append("")
    out.append(f"Files: {config_dir()}. Use one as --config=NAME:VARIANT,OPTION,... (e.g. cifar:plain56,short); "
               "any field can be overridden: --config.train.total_steps=1000.")
    return "\n".join(out)
