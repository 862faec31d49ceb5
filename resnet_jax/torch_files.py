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
    """One storage of the file: its element type and, once read, its elements (1-D)."""

    def __init__(self, type_name: str, numel: int):
        self.type_name, self.numel = type_name, numel
        self.data: np.ndarray | None = None


class _StorageType:
    """What `torch.FloatStorage` & co. resolve to: a name, never called."""

    def __init__(self, name: str):
        self.name = name


class _TensorRef:
    """A tensor that is a strided view of a storage; made an array once storages are read."""

    def __init__(self, storage: Any, offset: int, size: Any, stride: Any):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("a tensor whose storage is not a storage")
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise pickle.UnpicklingError("a tensor whose storage holds no data")
        if any(not isinstance(v, int) or v < 0 for v in (self.offset, *self.size, *self.stride)):
            raise pickle.UnpicklingError("a tensor with a negative or non-integer size, stride or offset")
        if len(self.size) != len(self.stride):
            raise pickle.UnpicklingError("a tensor whose size and stride differ in length")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if all(self.size) else -1
        if last >= data.size:
            raise pickle.UnpicklingError("a tensor that reaches past the end of its storage")
        if not all(self.size):
            array = np.zeros(self.size, data.dtype)
        else:
            view = np.lib.stride_tricks.as_strided(
                data[self.offset:], self.size, [s * data.itemsize for s in self.stride], writeable=False)
            array = np.array(view)  # a copy, in C order
        if self.storage.type_name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor (torch < 1.0) and _rebuild_tensor_v2 (requires_grad,
    backward hooks and metadata follow; none matters for weights)."""
    return _TensorRef(storage, storage_offset, size, stride)


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
    """pickle.Unpickler that resolves only `_ALLOWED` and reads torch's storage references."""

    def __init__(self, file, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file)
        self.storages, self.legacy = storages, legacy

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
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise pickle.UnpicklingError("a storage of an unknown type")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.name, numel)
        storage = self.storages[key]
        view = saved_id[5] if len(saved_id) == 6 else None
        if view is not None:  # (view key, offset, size): pre-1.0 storage views
            raise pickle.UnpicklingError("a storage view (saved by a PyTorch older than 1.0), which is not supported")
        if not self.legacy:
            storage.data = self.read_record(key, storage)
        return storage

    def read_record(self, key: str, storage: _Storage) -> np.ndarray:
        raise NotImplementedError


def _resolve(obj: Any) -> Any:
    """The loaded object with every tensor made a numpy array; containers rebuilt alike."""
    if isinstance(obj, _TensorRef):
        return obj.array()
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def _elements(raw: bytes, storage: _Storage, little_endian: bool, what: str) -> np.ndarray:
    dtype = np.dtype(STORAGE_DTYPES[storage.type_name]).newbyteorder("<" if little_endian else ">")
    if len(raw) < storage.numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"{what} is shorter than its {storage.numel} elements")
    return np.frombuffer(raw, dtype, storage.numel).astype(dtype.newbyteorder("="))


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise pickle.UnpicklingError("a zip file without the one data.pkl torch.save writes")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"

        class Unpickler(_Unpickler):
            def read_record(self, key, storage):
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise pickle.UnpicklingError(f"storage {key} is missing from the zip")
                return _elements(archive.read(name), storage, byteorder == "little", f"storage {key}")

        with archive.open(pickles[0]) as f:
            return _resolve(Unpickler(io.BytesIO(f.read()), {}, legacy=False).load())


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        if _Unpickler(f, {}, legacy=True).load() != LEGACY_MAGIC_NUMBER:
            raise pickle.UnpicklingError("not a torch.save file (no magic number)")
        if _Unpickler(f, {}, legacy=True).load() != LEGACY_PROTOCOL_VERSION:
            raise pickle.UnpicklingError("an unknown torch.save protocol version")
        sys_info = _Unpickler(f, {}, legacy=True).load()
        little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        storages: dict[str, _Storage] = {}
        result = _Unpickler(f, storages, legacy=True).load()
        keys = _Unpickler(f, {}, legacy=True).load()
        if not isinstance(keys, list):
            raise pickle.UnpicklingError("no list of storage keys after the object")
        for key in keys:
            # Each storage: its element count (int64, little-endian), then its elements.
            storage = storages.get(str(key))
            header = f.read(8)
            if storage is None or len(header) != 8:
                raise pickle.UnpicklingError(f"storage {key} is missing or truncated")
            (numel,) = struct.unpack("<q" if little_endian else ">q", header)
            if numel != storage.numel:
                raise pickle.UnpicklingError(f"storage {key} holds {numel} elements, its tensors expect {storage.numel}")
            size = numel * np.dtype(STORAGE_DTYPES[storage.type_name]).itemsize
            storage.data = _elements(f.read(size), storage, little_endian, f"storage {key}")
        return _resolve(result)


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


def load(path: str) -> Any:
    """The object saved in `path`, with every tensor a numpy array.

    Raises:
      UserError: the file is missing, is none of the three formats, or names anything beyond
        tensors and plain containers (nothing from it was called).
    """
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    if _is_safetensors(path):
        return _load_safetensors(path)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, zipfile.BadZipFile, UnicodeDecodeError, struct.error) as error:
        reason = str(error).strip() or type(error).__name__
        raise UserError(f"cannot read {path} as a PyTorch state dict: {reason}") from None
