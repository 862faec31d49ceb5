"""The official CIFAR-10 / CIFAR-100 python archive -> an .npz that `data.source=npz` trains on.

    python -m resnet_jax.data.cifar_npz cifar-10-python.tar.gz cifar10.npz
    python -m resnet_jax.data.cifar_npz cifar-100-python.tar.gz cifar100.npz

The archives are at https://www.cs.toronto.edu/~kriz/cifar.html (Krizhevsky 2009).
CIFAR-10: `cifar-10-batches-py/data_batch_1` ... `_5` (training, in that order),
`test_batch` and `batches.meta`; CIFAR-100: `cifar-100-python/train`, `test` and `meta`
(the 100 fine labels). Writes `x_train`, `y_train`, `x_test`, `y_test` (uint8 images
[N, 32, 32, 3], int64 labels [N]) and `label_names`, then train with

    resnet-jax train --config=cifar:resnet56,npz --config.data.path=cifar10.npz --workdir=runs/r56

The batches are pickles: they are read with an unpickler that rebuilds plain containers and
numpy arrays only, so a file that tries to run anything else is refused.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import sys
import tarfile

import numpy as np

from resnet_jax.errors import USER_ERROR_EXIT, UserError

# The layouts of the two archives: folder, training members, test member, meta member,
# the label key, the label-names key.
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}
IMAGES_PER_ROW = 3 * 32 * 32  # one row: 1,024 red, then green, then blue values, row-major


class _Unpickler(pickle.Unpickler):
    """Only what the official batches hold: dicts, lists, strings, numbers, numpy arrays."""

    _reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array rebuild, whichever module holds it
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}  # how Python 3 writes bytes at protocol 2

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not an array or a plain container") from None


def _unpickle(data: bytes) -> dict:
    # latin1: the batches were written by Python 2, whose str holds the arrays' raw bytes.
    batch = _Unpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(batch, dict):
        raise pickle.UnpicklingError(f"a {type(batch).__name__}, not a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}


def _layout(names: set[str]) -> str:
    for kind, (folder, train, test, meta, *_) in LAYOUTS.items():
        if f"{folder}/{test}" in names:
            return kind
    raise UserError("not a CIFAR python archive: it has neither cifar-10-batches-py/test_batch nor "
                    "cifar-100-python/test (use cifar-10-python.tar.gz or cifar-100-python.tar.gz)")


def _batch(archive: tarfile.TarFile, member: tarfile.TarInfo, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    name = member.name
    try:
        batch = _unpickle(archive.extractfile(member).read())
        data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, tarfile.TarError,
            OSError) as error:
        raise UserError(f"{name} is not a CIFAR batch ({type(error).__name__}: {error})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGES_PER_ROW or labels.shape != data.shape[:1]:
        raise UserError(f"{name}: expected uint8 data [N, {IMAGES_PER_ROW}] and N labels, got {data.dtype} "
                        f"{list(data.shape)} and {list(labels.shape)} labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-first rows -> NHWC
    return np.ascontiguousarray(images), labels.astype(np.int64)


def convert(archive_path: str, out: str) -> dict[str, tuple[int, ...]]:
    """Reads the archive at `archive_path` and writes `out` (.npz).

    Returns:
      Each written array's shape, and "kind" ("cifar10" or "cifar100").

    Raises:
      UserError: a missing or unreadable archive, or one that is not an official CIFAR one.
    """
    if not os.path.isfile(archive_path):
        raise UserError(f"no such file: {archive_path}")
    try:
        archive = tarfile.open(archive_path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UserError(f"cannot read {archive_path} as a tar archive ({type(error).__name__}: {error}); "
                        "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html") from None
    with archive:
        try:
            members = {m.name.removeprefix("./"): m for m in archive.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as error:  # truncated download
            raise UserError(f"{archive_path} is truncated or corrupt ({type(error).__name__}: {error})") from None
        names = set(members)
        kind = _layout(names)
        folder, train_members, test_member, meta_member, label_key, names_key = LAYOUTS[kind]
        missing = [m for m in [*train_members, test_member] if f"{folder}/{m}" not in names]
        if missing:
            raise UserError(f"{archive_path} lacks {folder}/{missing[0]}")
        train = [_batch(archive, members[f"{folder}/{m}"], label_key) for m in train_members]
        x_test, y_test = _batch(archive, members[f"{folder}/{test_member}"], label_key)
        label_names = None
        if f"{folder}/{meta_member}" in names:
            try:
                meta = _unpickle(archive.extractfile(members[f"{folder}/{meta_member}"]).read())
                label_names = np.asarray([n.decode("latin1") if isinstance(n, bytes) else str(n)
                                          for n in meta[names_key]])
            except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as error:
                raise UserError(f"{folder}/{meta_member} is not CIFAR's meta file ({type(error).__name__}: "
                                f"{error})") from None
    arrays = {"x_train": np.concatenate([x for x, _ in train]), "y_train": np.concatenate([y for _, y in train]),
              "x_test": x_test, "y_test": y_test}
    if label_names is not None:
        arrays["label_names"] = label_names
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UserError(f"no such directory for the output: {directory}")
    partial = out + ".partial.npz"  # written whole, then renamed: no half-written OUT
    try:
        np.savez(partial, **arrays)
        os.replace(partial, out)
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror or error}") from None
    return {"kind": kind, **{k: v.shape for k, v in arrays.items()}}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    args = argv[1:]
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in args):
        print(__doc__.strip())
        return
    try:
        if len(args) != 2 or any(a.startswith("-") for a in args):
            raise UserError("usage: python -m resnet_jax.data.cifar_npz ARCHIVE.tar.gz OUT.npz "
                            "(e.g. cifar-10-python.tar.gz cifar10.npz)")
        shapes = convert(os.path.expanduser(args[0]), os.path.expanduser(args[1]))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    classes = shapes["label_names"][0] if "label_names" in shapes else "?"
    print(f"wrote {args[1]}: {shapes['kind']}, x_train {list(shapes['x_train'])}, x_test {list(shapes['x_test'])} "
          f"(uint8 NHWC), {classes} classes; train with --config=cifar:resnet56,npz"
          f"{',cifar100' if shapes['kind'] == 'cifar100' else ''} --config.data.path={args[1]}")


if __name__ == "__main__":
    main()
