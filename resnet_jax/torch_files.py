"""Reads PyTorch state dicts into numpy without torch and without running code from the file.

Three formats, told apart by their content, not their name:

- torch's zip format (`torch.save` since PyTorch 1.6): a zip holding `data.pkl` and one
  record per storage under `data/`;
- torch's legacy format (`_use_new_zipfile_serialization=False`, and every file saved before
  1.6, akamaster's `.th` files among them): four pickles in a row (magic number, protocol,
  system info, the object), the storage keys, then each storage's raw bytes;
- `.safetensors` (what timm and the Hugging Face hub serve), through the `safetensors`
  package's numpy API.

A pickle can call any importable function while it loads. The unpickler here resolves
only the names a state dict needs (`collections.OrderedDict`, torch's tensor and parameter
rebuild functions, the storage types) and answers each with a function of its own that builds
numpy arrays; any other global in the file is refused before it is called. So a hostile
`.pth` file cannot run code here, and `torch` is never imported.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import safetensors.numpy

from resnet_jax.errors import UserError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch's storage type names -> numpy dtypes. bfloat16 has no numpy dtype: its 16 bits are
# read as uint16 and widened to float32 exactly (a bfloat16 is the top half of a float32).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage:
    """One storage of the file: its element type, the element count it claims and, once
    read, its elements (1-D)."""

    def __init__(self, type_name: str, key: str, numel: int):
        self.type_name, self.key, self.numel = type_name, key, numel
        self.data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(STORAGE_DTYPES[self.type_name]).itemsize


class _StorageType:
    """What `torch.FloatStorage` & co. resolve to: a name, never called."""

    def __init__(self, name: str):
        self.name = name


class Tensor:
    """A tensor of the file: a strided view of a storage, its size and stride checked against
    the storage's claimed length. Its elements are copied out only on `numpy()` (or
    `np.asarray`), so a reader can check `shape` against what it expects first.

    Attributes:
      shape, dtype, size (elements), nbytes: those of the array `numpy()` returns.
    """

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("a tensor whose storage is not a storage")
        if not (isinstance(size, tuple | list) and isinstance(stride, tuple | list)):
            raise pickle.UnpicklingError("a tensor whose size or stride is not a tuple")
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(size), tuple(stride)
        if any(type(v) is not int or v < 0 for v in (self.offset, *self.shape, *self.stride)):
            raise pickle.UnpicklingError("a tensor with a negative or non-integer size, stride or offset")
        if len(self.shape) != len(self.stride):
            raise pickle.UnpicklingError("a tensor whose size and stride differ in length")
        self.size = int(np.prod(self.shape, dtype=object))
        bf16 = storage.type_name == "BFloat16Storage"
        self.dtype = np.dtype(np.float32 if bf16 else STORAGE_DTYPES[storage.type_name])
        self.nbytes = self.size * self.dtype.itemsize
        self.ndim = len(self.shape)

    def last_element(self) -> int:
        """The largest storage index the view reads (-1 when it has no elements)."""
        if not self.size:
            return -1
        return self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))

    def numpy(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise pickle.UnpicklingError("a tensor whose storage holds no data")
        if not self.size:
            array = np.zeros(self.shape, data.dtype)
        else:
            view = np.lib.stride_tricks.as_strided(
                data[self.offset:], self.shape, [s * data.itemsize for s in self.stride], writeable=False)
            array = np.array(view)  # a copy, in C order
        if self.storage.type_name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype})"


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor (torch < 1.0) and _rebuild_tensor_v2 (requires_grad,
    backward hooks and metadata follow; none matters for weights)."""
    return Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its tensor."""
    return data


# The only globals a file may name. Everything else is refused (see _Unpickler.find_class).
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{(module, name): _StorageType(name) for name in STORAGE_DTYPES for module in ("torch", "torch.cuda")},
}


class _Unpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `_ALLOWED` and records torch's storage references
    (their elements are read later, once every claim has been checked)."""

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a state dict "
                                         "(only tensors and plain containers are read)") from None

    def persistent_load(self, saved_id):
        # ("storage", storage type, key, location, numel[, view metadata (legacy only)])
        if not (isinstance(saved_id, tuple) and len(saved_id) in (5, 6) and saved_id[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"an unknown persistent object {str(saved_id)[:80]}")
        storage_type, key, _location, numel = saved_id[1:5]
        if not isinstance(storage_type, _StorageType) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError("a storage of an unknown type or a negative length")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.name, key, numel)
        storage = self.storages[key]
        if storage.numel != numel or storage.type_name != storage_type.name:
            raise pickle.UnpicklingError(f"storage {key} is named with two lengths or types")
        view = saved_id[5] if len(saved_id) == 6 else None
        if view is not None:  # (view key, offset, size): pre-1.0 storage views
            raise pickle.UnpicklingError("a storage view (saved by a PyTorch older than 1.0), which is not supported")
        return storage


def _tensors(obj: Any, key: Any = None) -> Iterator[tuple[Any, Tensor]]:
    """(its key in the innermost dict, or None) and each tensor of the loaded object."""
    if isinstance(obj, Tensor):
        yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, k)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, key)


class _Limit:
    """What may be allocated: storages' bytes (and, unless the reader checks shapes itself,
    every view's), at most `max_bytes`; `what` completes "more than the N bytes ..."."""

    def __init__(self, max_bytes: int, what: str):
        self.max_bytes, self.what = max_bytes, what


def _name(key: Any) -> str:
    return f"key {key!r}" if key is not None else "a tensor"


def _check_views(obj: Any) -> dict[str, Any]:
    """Every view within its storage's claimed length.

    Returns:
      storage key -> the key of the first tensor that uses it (for messages).
    """
    owners: dict[str, Any] = {}
    for key, tensor in _tensors(obj):
        owners.setdefault(tensor.storage.key, key)
        last = tensor.last_element()
        if last >= tensor.storage.numel:
            raise pickle.UnpicklingError(f"{_name(key)} reaches element {last} of its storage, which holds "
                                         f"{tensor.storage.numel}")
    return owners


def _check_limit(obj: Any, storages: dict[str, _Storage], owners: dict[str, Any], limit: _Limit,
                 count_views: bool) -> None:
    """Storages (and, with `count_views`, the arrays made from the views) within `limit`."""
    total = 0
    for storage in storages.values():
        total += storage.nbytes
        if total > limit.max_bytes:
            raise pickle.UnpicklingError(f"{_name(owners.get(storage.key))}: its storage claims {storage.nbytes:,} "
                                         f"bytes, more than the {limit.max_bytes:,} bytes {limit.what}")
    if count_views:
        total = 0
        for key, tensor in _tensors(obj):
            total += tensor.nbytes
            if total > limit.max_bytes:
                raise pickle.UnpicklingError(f"{_name(key)} views {tensor.size:,} elements ({tensor.nbytes:,} "
                                             f"bytes): the arrays would take more than the {limit.max_bytes:,} "
                                             f"bytes {limit.what}")


def _resolve(obj: Any, materialize: bool) -> Any:
    """The loaded object with every tensor made a numpy array (`materialize`); containers rebuilt alike."""
    if isinstance(obj, Tensor):
        return obj.numpy() if materialize else obj
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v, materialize)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, materialize) for v in obj)
    return obj


def _elements(raw: bytes, storage: _Storage, little_endian: bool) -> np.ndarray:
    dtype = np.dtype(STORAGE_DTYPES[storage.type_name]).newbyteorder("<" if little_endian else ">")
    return np.frombuffer(raw, dtype, storage.numel).astype(dtype.newbyteorder("="))


def _load_zip(path: str, limit: _Limit, materialize: bool) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise pickle.UnpicklingError("a zip file without the one data.pkl torch.save writes")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        pickled = archive.getinfo(pickles[0])
        if pickled.file_size > limit.max_bytes + (64 << 20):  # the pickle of a state dict is small
            raise pickle.UnpicklingError(f"its data.pkl claims {pickled.file_size:,} bytes")
        with archive.open(pickles[0]) as f:
            storages: dict[str, _Storage] = {}
            result = _Unpickler(io.BytesIO(f.read()), storages).load()
        owners = _check_views(result)
        size = os.path.getsize(path)
        for key, storage in storages.items():
            name = f"{prefix}data/{key}"
            if name not in names:
                raise pickle.UnpicklingError(f"{_name(owners.get(key))}: its storage {key} is missing from the zip")
            info = archive.getinfo(name)
            # A stored entry (torch's) holds its compressed size; a compressed one at most its
            # claimed size, and never more than the zip's own size times zlib's best ratio.
            holds = info.compress_size if info.compress_type == zipfile.ZIP_STORED else min(info.file_size, 1032 * size)
            if storage.nbytes > holds:
                raise pickle.UnpicklingError(f"{_name(owners.get(key))}: its storage claims {storage.nbytes:,} "
                                             f"bytes, the zip holds {holds:,} for it")
        _check_limit(result, storages, owners, limit, count_views=materialize)
        for key, storage in storages.items():
            with archive.open(f"{prefix}data/{key}") as f:
                raw = f.read(storage.nbytes)  # no more than the claim, whatever the entry says
            if len(raw) < storage.nbytes:
                raise pickle.UnpicklingError(f"{_name(owners.get(key))}: its storage {key} is shorter than its "
                                             f"{storage.numel} elements")
            storage.data = _elements(raw, storage, byteorder == "little")
        return _resolve(result, materialize)


def _load_legacy(path: str, limit: _Limit, materialize: bool) -> Any:
    with open(path, "rb") as f:
        if _Unpickler(f, {}).load() != LEGACY_MAGIC_NUMBER:
            raise pickle.UnpicklingError("not a torch.save file (no magic number)")
        if _Unpickler(f, {}).load() != LEGACY_PROTOCOL_VERSION:
            raise pickle.UnpicklingError("an unknown torch.save protocol version")
        sys_info = _Unpickler(f, {}).load()
        little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        storages: dict[str, _Storage] = {}
        result = _Unpickler(f, storages).load()
        keys = _Unpickler(f, {}).load()
        if not isinstance(keys, list):
            raise pickle.UnpicklingError("no list of storage keys after the object")
        owners = _check_views(result)
        size, position = os.fstat(f.fileno()).st_size, f.tell()
        for key in keys:  # the claims against the bytes the file holds after the pickles
            storage = storages.get(str(key))
            if storage is None:
                raise pickle.UnpicklingError(f"storage {key} is listed but no tensor uses it")
            position += 8
            if storage.nbytes > size - position:
                raise pickle.UnpicklingError(f"{_name(owners.get(storage.key))}: its storage claims "
                                             f"{storage.nbytes:,} bytes, the file holds {max(size - position, 0):,} "
                                             "after it")
            position += storage.nbytes
        _check_limit(result, storages, owners, limit, count_views=materialize)
        for key in keys:
            # Each storage: its element count (int64, little-endian), then its elements.
            storage = storages.get(str(key))
            header = f.read(8)
            if storage is None or len(header) != 8:
                raise pickle.UnpicklingError(f"storage {key} is missing or truncated")
            (numel,) = struct.unpack("<q" if little_endian else ">q", header)
            name = _name(owners.get(storage.key))
            if numel != storage.numel:
                raise pickle.UnpicklingError(f"{name}: its storage holds {numel} elements, its tensors expect "
                                             f"{storage.numel}")
            storage.data = _elements(f.read(storage.nbytes), storage, little_endian)
        unread = [key for key, storage in storages.items() if storage.data is None]
        if unread:
            raise pickle.UnpicklingError(f"{_name(owners.get(unread[0]))}: its storage {unread[0]} is not in the file")
        return _resolve(result, materialize)


def _is_safetensors(path: str) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return dict(safetensors.numpy.load_file(path))
    except Exception as error:  # noqa: BLE001 -- the package raises several kinds
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot read {path} as safetensors ({reason}); only float, integer and bool "
                        "tensors are read (save bfloat16 weights as float32)") from None


def load(path: str, max_bytes: int | None = None, what: str = "", materialize: bool = True) -> Any:
    """The object saved in `path`, with every tensor a numpy array (or a `Tensor`).

    Nothing is allocated for a tensor before its claims are checked: each view's size,
    stride and offset against its storage's length, each storage's length against the bytes
    the file holds for it, and all storages together against `max_bytes`.

    Args:
      max_bytes: the most the storages may take together (say, what the model the weights
        are for can need); `what` says what that is, for the message. By default: twice
        the file's size (bfloat16 storages are widened to float32), which no honest file
        exceeds; with `materialize`, the views together are bound by it too.
      materialize: False returns `Tensor`s, read into arrays only when asked (the caller
        checks their shapes first: a view that repeats one element, stride 0, may claim any
        shape).

    Raises:
      UserError: the file is missing, is none of the three formats, names anything beyond
        tensors and plain containers (nothing from it was called), or claims more than it
        holds or than `max_bytes`; a claim's message names the tensor's key.
    """
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    if max_bytes is None:
        max_bytes, what = 2 * os.path.getsize(path), "that twice the file's size allows"
    limit = _Limit(max_bytes, what or "allowed")
    if _is_safetensors(path):
        if os.path.getsize(path) > max_bytes + (64 << 20):
            raise UserError(f"cannot read {path}: its {os.path.getsize(path):,} bytes are more than the "
                            f"{max_bytes:,} bytes {limit.what}")
        return _load_safetensors(path)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, limit, materialize)
        return _load_legacy(path, limit, materialize)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, zipfile.BadZipFile, UnicodeDecodeError, struct.error, OverflowError) as error:
        reason = str(error).strip() or type(error).__name__
        raise UserError(f"cannot read {path} as a PyTorch state dict: {reason}") from None
    except MemoryError:  # an honest file larger than this machine's memory
        raise UserError(f"not enough memory to read {path} ({os.path.getsize(path):,} bytes)") from None
