"""The restricted unpickler: task_vectors checkpoints (``zeroshot.pt``, ``finetuned.pt``, ``head_<task>.pt``)
read into inert objects and tensors without running their code.

Those files are whole pickled ``nn.Module``s (a ``src.modeling.ImageEncoder`` around an
open_clip 2.0.2 ``CLIP``, a ``ClassificationHead``), written by ``torch.save`` (zip or legacy)
or by a raw ``pickle.dump``. Unpickling them normally imports and runs their classes. Here a
restricted unpickler resolves every global through one allowlist:

- torch's tensor and storage rebuilders, replaced by our own functions that only build tensors
  from the file's bytes (a raw pickle's nested ``torch.storage._load_from_bytes`` is read by
  this same reader, which accepts nothing but a storage there);
- the known module and transform classes, replaced by inert stand-ins that record their pickled
  state and have no behaviour; ``OrderedDict``, ``set``, torch dtypes and devices.

Anything else, a global outside the allowlist or an opcode that would call, construct or set
state on anything but those, stops the read with one line naming it, before anything is
written. :mod:`safemerge.convert.task_vectors` then collects the tensors from the stand-ins.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from safemerge.errors import CheckpointError, UnsafeCheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy (non-zip) serialisation starts with this number

# Classes a task_vectors checkpoint pickles (names of open_clip 2.0.2 and later): stand-ins.
_STAND_INS: dict[str, set[str]] = {
    "src.modeling": {"ImageEncoder", "ClassificationHead"},
    "open_clip.model": {
        "CLIP",
        "VisualTransformer",
        "VisionTransformer",
        "Transformer",
        "ResidualAttentionBlock",
        "LayerNorm",
        "LayerNormFp32",
        "QuickGELU",
    },
    "open_clip.transformer": {
        "VisionTransformer",
        "Transformer",
        "ResidualAttentionBlock",
        "LayerNorm",
        "LayerNormFp32",
        "QuickGELU",
    },
    "open_clip.transform": {"_convert_to_rgb", "ResizeMaxSize"},
    "torch.nn.modules.conv": {"Conv2d"},
    "torch.nn.modules.linear": {"Linear", "NonDynamicallyQuantizableLinear", "Identity"},
    "torch.nn.modules.activation": {"MultiheadAttention", "GELU"},
    "torch.nn.modules.container": {"Sequential", "ModuleList"},
    "torch.nn.modules.sparse": {"Embedding"},
    "torch.nn.modules.normalization": {"LayerNorm"},
    "torch.nn.modules.dropout": {"Dropout"},
    "torchvision.transforms.transforms": {
        "Compose",
        "Resize",
        "CenterCrop",
        "ToTensor",
        "Normalize",
        "RandomResizedCrop",
    },
    "torchvision.transforms.functional": {"InterpolationMode"},
}
_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_TORCH_VALUES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}


class StandIn:
    """An inert record of a pickled object of an allowlisted class: its arguments and state, no code."""

    qualname = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args, **kwargs) -> None:  # constructing a stand-in calls nothing
        pass

    def __setstate__(self, state) -> None:
        self.state = state[0] if isinstance(state, tuple) and state and isinstance(state[0], dict) else state

    def __repr__(self) -> str:
        return f"<stand-in {self.qualname}>"


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, _DTYPES[name]


def _qualname(obj: Any) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{type(obj).__module__}.{type(obj).__qualname__} object"


class _Unpickler(pickle._Unpickler):  # the Python implementation, whose opcodes can be overridden one by one
    """Resolves globals only through the allowlist; calls only what it resolved itself."""

    def __init__(self, file: BinaryIO, source: str, storages: _Storages) -> None:
        super().__init__(file)
        self.source, self.storages = source, storages
        self.stand_ins: dict[str, type] = {}
        self.callables: dict[int, Any] = {}  # id -> object: what REDUCE / NEWOBJ may call
        self.load_from_bytes = self._load_from_bytes  # one bound method, so its identity is stable
        for value in (
            OrderedDict,
            set,
            frozenset,
            torch.device,
            _rebuild_tensor,
            _rebuild_parameter,
            _rebuild_parameter_with_state,
            self.load_from_bytes,
        ):
            self.callables[id(value)] = value
        self.dispatch = dict(pickle._Unpickler.dispatch)
        for opcode, handler in (
            (pickle.REDUCE, _Unpickler._reduce),
            (pickle.BUILD, _Unpickler._build),
            (pickle.NEWOBJ, _Unpickler._newobj),
            (pickle.NEWOBJ_EX, _Unpickler._newobj_ex),
        ):
            self.dispatch[opcode[0]] = handler

    def refuse(self, what: str) -> None:
        raise UnsafeCheckpointError(
            f"refusing to load {self.source}: it asks for {what}, which is outside the allowlist of task_vectors "
            "checkpoints (tensors, storages, the open_clip/torch/torchvision module classes as inert records); "
            "nothing was run and nothing written"
        )

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol 2 writes Python 2's name
        if name in _STAND_INS.get(module, ()):
            qualified = f"{module}.{name}"
            if qualified not in self.stand_ins:
                self.stand_ins[qualified] = type(name, (StandIn,), {"qualname": qualified})
                self.callables[id(self.stand_ins[qualified])] = self.stand_ins[qualified]
            return self.stand_ins[qualified]
        allowed = {
            ("collections", "OrderedDict"): OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("torch", "device"): torch.device,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
            ("torch.storage", "_load_from_bytes"): self.load_from_bytes,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_VALUES:
            return _TORCH_VALUES[name]
        self.refuse(f"the global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # legacy torch.save stores each module class as ('module', class, file, source): the class is the object
            if isinstance(pid[1], type) and issubclass(pid[1], StandIn):
                return pid[1]
            self.refuse(f"the module class {str(pid[1])[:80]}")
        if not (
            isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], _StorageType)
        ):
            self.refuse(f"the persistent object {str(pid)[:80]}")
        return self.storages.get(pid)

    def _load_from_bytes(self, data: bytes) -> Tensor:
        """A raw pickle's storage: a nested torch.save of the storage alone, read by this reader."""
        if not isinstance(data, bytes):
            self.refuse("a storage that is not bytes")
        storage = read_pickle(io.BytesIO(data), self.source)
        if not isinstance(storage, _Storage):
            self.refuse(f"a nested object {_qualname(storage)} where a storage belongs")
        return storage

    def _callable(self, func: Any) -> Any:
        if self.callables.get(id(func)) is not func:
            self.refuse(f"a call of {_qualname(func)}")
        return func

    def _reduce(self) -> None:
        args = self.stack.pop()
        func = self._callable(self.stack[-1])
        self.stack[-1] = func(*args)

    def _newobj(self) -> None:
        args = self.stack.pop()
        cls = self._callable(self.stack.pop())
        self.append(cls.__new__(cls, *args))

    def _newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self._callable(self.stack.pop())
        self.append(cls.__new__(cls, *args, **kwargs))

    def _build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, StandIn):
            inst.__setstate__(state)
        elif isinstance(inst, OrderedDict) and isinstance(state, dict) and not state:
            pass
        else:
            self.refuse(f"setting the state of {_qualname(inst)}")

    def _instantiate(self, klass, args) -> None:  # INST / OBJ (protocols 0 and 1)
        self.append(self._callable(klass)(*args))


class _Storage(Tensor):
    """Marks the flat tensors a storage was read into (so a tensor can only be built on one)."""


class _Storages:
    """The storages of one file: zip entries, or the legacy format's blocks after the pickle."""

    def __init__(self, source: str, archive: zipfile.ZipFile | None = None, prefix: str = "", limit: int = 0) -> None:
        self.source, self.archive, self.prefix, self.limit = source, archive, prefix, limit
        self.loaded: dict[str, Tensor] = {}
        self.legacy_order: list[str] = []

    def get(self, pid: tuple) -> Tensor:
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if key not in self.loaded:
            if self.archive is not None:
                data = self.archive.read(f"{self.prefix}data/{key}")
                if len(data) != numel * _element_size(storage_type.dtype):
                    raise CheckpointError(
                        f"{self.source}: storage {key} has {len(data)} bytes, expected {numel} elements"
                    )
                flat = (
                    torch.frombuffer(bytearray(data), dtype=storage_type.dtype)
                    if data
                    else torch.empty(0, dtype=storage_type.dtype)
                )
            else:  # legacy: the bytes follow the pickle, filled in by read_pickle
                if int(numel) * _element_size(storage_type.dtype) > self.limit:
                    raise CheckpointError(f"{self.source} is truncated: storage {key} is larger than the file")
                flat = torch.empty(int(numel), dtype=storage_type.dtype)
            self.loaded[key] = flat.as_subclass(_Storage)
        storage = self.loaded[key]
        if len(pid) == 6 and pid[5] is not None:  # a view into another storage (old torch)
            view_key, offset, size = pid[5]
            root = self.get(pid[:2] + (view_key,) + pid[3:5])
            return root[int(offset) : int(offset) + int(size)]
        return storage


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> Tensor:
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"a tensor is built on a {type(storage).__name__}, not on a storage")
    return torch.as_strided(storage.as_subclass(Tensor), tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data, requires_grad=True, hooks=None) -> Tensor:
    if not isinstance(data, Tensor):
        raise CheckpointError(f"a parameter holds a {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad=True, hooks=None, state=None) -> Tensor:
    return _rebuild_parameter(data)


def read_pickle(file: BinaryIO, source: str) -> Any:
    """The object in a torch.save (zip or legacy) or raw pickle stream, through the allowlist."""
    head = file.read(4)
    file.seek(0)
    if head == b"PK\x03\x04":
        with zipfile.ZipFile(file) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(names) != 1:
                raise CheckpointError(f"{source} is a zip file but not a torch.save archive (no single data.pkl)")
            prefix = names[0][: -len("data.pkl")]
            if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder") != b"little":
                raise CheckpointError(f"{source} was written on a big-endian machine; convert it there to safetensors")
            storages = _Storages(source, archive, prefix)
            return _Unpickler(io.BytesIO(archive.read(names[0])), source, storages).load()
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    storages = _Storages(source, limit=size)
    first = _Unpickler(file, source, storages).load()
    if not (type(first) is int and first == LEGACY_MAGIC):
        return first  # a raw pickle: that was the whole object
    _Unpickler(file, source, storages).load()  # protocol version
    info = _Unpickler(file, source, storages).load()
    if not isinstance(info, dict) or not info.get("little_endian", True):
        raise CheckpointError(f"{source} was written on a big-endian machine; convert it there to safetensors")
    result = _Unpickler(file, source, storages).load()
    keys = _Unpickler(file, source, storages).load()
    if not isinstance(keys, list):
        raise CheckpointError(f"{source}: the legacy storage list is not a list")
    for key in keys:
        storage = storages.loaded.get(str(key))
        if storage is None:
            raise CheckpointError(f"{source}: storage {key} is listed but never used")
        numel = int.from_bytes(_read_exactly(file, 8, source), "little", signed=True)
        if numel != storage.numel():
            raise CheckpointError(f"{source}: storage {key} holds {numel} elements, the pickle says {storage.numel()}")
        data = _read_exactly(file, numel * storage.element_size(), source)
        if numel:
            storage.copy_(torch.frombuffer(bytearray(data), dtype=storage.dtype))
    return result


def _read_exactly(file: BinaryIO, n: int, source: str) -> bytes:
    data = file.read(n)
    if len(data) != n:
        raise CheckpointError(f"{source} is truncated: a storage ends early; re-download it")
    return data


def load(path: Path) -> Any:
    """:func:`read_pickle` of a file; damage is a one-line :class:`CheckpointError` naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as file:
            return read_pickle(file, str(path))
    except (CheckpointError, UnsafeCheckpointError):
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        KeyError,
        ValueError,
        TypeError,
        IndexError,
        RuntimeError,
        AttributeError,
        OverflowError,
        MemoryError,
    ) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {detail}); it may be truncated or corrupt"
        ) from None
