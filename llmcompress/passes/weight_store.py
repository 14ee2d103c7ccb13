"""The disk layer under the derived-weight cache: what a pass derives with `derive(..., persist=True)` (calibrated
quantization: GPTQ, AWQ, SmoothQuant) is kept in `weights/` of the cache folder (`cache_dir.cache_root()`), so a
second process compiling the same model with the same recipe loads it instead of calibrating again.

Entry points: `open_store(option)` (None when the `disk_cache` option or `LLMCOMPRESS_DISK_CACHE` turns it off),
`entry_key(...)`, `WeightStore.load / save / entries / clear`, `content_hash(tensor, version)`.

* Key: sha256 of the `DerivedKey` (the pass's uuid: its code and options; parts: the layer's settings and the
  calibration data's fingerprint), the content hash of every source weight (sha256 of its bytes, dtype and shape)
  and the view chain from each weight. Never an address, a path or a host name: the folder can be copied to
  another machine that compiles the same model with the same recipe.
* File: `weights/<key[:2]>/<key>.safetensors` (never pickle). Its header metadata holds the format version, the key,
  the value's structure (a tensor, or tuples / lists / str-keyed dicts of tensors and plain values) and a checksum
  of each tensor's bytes; a missing, truncated, corrupt or mismatching file is ignored with one
  `DiskCacheWarning`, deleted, and the weight computed again (and written anew).
* Writes go to a temporary file in the same folder, then `os.replace`: readers and concurrent writers (two
  processes compiling the same model) see the old file or the new one, never a torn one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import enum
import hashlib
import json
import os
import tempfile
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llmcompress.cache_dir import cache_root
from llmcompress.errors import DiskCacheWarning, OptionError
from llmcompress.version import __version__

FORMAT = "llmcompress-derived-weight"
FORMAT_VERSION = 1
"""Bump when the file layout or the key's recipe changes: older files then no longer match any key."""
ENV_SWITCH = "LLMCOMPRESS_DISK_CACHE"
_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes", "")

MISSING = object()
"""What `WeightStore.load` returns when there is no usable entry."""


def disk_cache_enabled(option: bool = True) -> bool:
    """The `disk_cache` option, unless `LLMCOMPRESS_DISK_CACHE` turns it off; a value of the variable that is not
    one of 0/1, false/true, off/on, no/yes raises `OptionError`."""
    raw = os.environ.get(ENV_SWITCH)
    if raw is None:
        return option
    value = raw.strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return option
    raise OptionError(f"environment variable {ENV_SWITCH}={raw!r}: expected 0, 1, false, true, off, on, no or yes "
                      "(0 turns the derived-weight disk cache off; 1 leaves it to the disk_cache option)")


def weights_dir() -> Path:
    return cache_root() / "weights"


def open_store(option: bool = True) -> WeightStore | None:
    """The store under the cache folder, or None when the option or the environment switches it off."""
    return WeightStore(weights_dir()) if disk_cache_enabled(option) else None


# --- keys ------------------------------------------------------------------------------------------------------------

# id(tensor) -> (version, digest); an entry dies with its tensor (ids are reused afterwards).
_HASHES: dict[int, tuple[int, str]] = {}


def content_hash(t: torch.Tensor, version: int) -> str:
    """sha256 of a tensor's bytes (any dtype: hashed through a uint8 view), dtype and shape; computed once per tensor
    and version in a process. sha256 rather than blake2b: 0.61 s against 1.59 s per GiB of bf16 on this 2-core CPU
    (contended; hashlib's sha256 uses the SHA extensions)."""
    entry = _HASHES.get(id(t))
    if entry is not None and entry[0] == version:
        return entry[1]
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)};".encode())
    h.update(_raw_bytes(t))
    digest = h.hexdigest()
    if entry is None:
        weakref.finalize(t, _HASHES.pop, id(t), None)
    _HASHES[id(t)] = (version, digest)
    return digest


def _raw_bytes(t: torch.Tensor) -> Any:
    """The tensor's bytes as a buffer over its CPU memory (a copy's for other devices or layouts). Not through
    `Tensor.numpy()`: that marks the storage it shares as not resizable, for good, and a weight hashed through it could
    no longer be released (`release_weights` resizes storages to 0). Same speed: 0.30 s per 256 MiB both ways."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if flat.numel() == 0:
        return b""
    if flat.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        return flat.numpy()  # a copy: numpy keeps it alive
    return memoryview((ctypes.c_ubyte * flat.numel()).from_address(flat.data_ptr())).cast("B")


def hashable_tensor(t: Any) -> bool:
    """A plain tensor with real data (not meta, not a subclass such as a fake or distributed tensor)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta"


class _Unkeyable(Exception):
    pass


def _canon(v: Any) -> Any:
    """A JSON form of a key part that is the same in every process (frozensets sorted, floats exact, types tagged)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, enum.Enum):
        return ["enum", f"{type(v).__module__}.{type(v).__qualname__}", v.name]
    if isinstance(v, int):
        return ["int", str(v)]
    if isinstance(v, float):
        return ["float", repr(v)]
    if isinstance(v, str):
        return ["str", v]
    if isinstance(v, bytes):
        return ["bytes", v.hex()]
    if isinstance(v, torch.dtype):
        return ["dtype", str(v)]
    if isinstance(v, (tuple, list)):
        return ["seq", [_canon(x) for x in v]]
    if isinstance(v, frozenset):
        return ["set", sorted((_canon(x) for x in v), key=lambda c: json.dumps(c, sort_keys=True))]
    if isinstance(v, (torch.memory_format, torch.layout, torch.device)):
        return ["torch", str(v)]
    raise _Unkeyable(f"{type(v).__name__} {v!r}")


def entry_key(uuid: str, parts: tuple, bases: Sequence[torch.Tensor], versions: Sequence[int], views: Any
              ) -> str | None:
    """The file key of a derived weight, or None when something in it has no stable form (it is then not stored).

    uuid, parts: the `DerivedKey`; bases: the source weights (their content, not their identity); views: the view
    chain from each base to what the pass read (plain values)."""
    try:
        payload = {"format": FORMAT_VERSION, "uuid": uuid, "parts": _canon(parts), "views": _canon(views),
                   "bases": [content_hash(b, v) for b, v in zip(bases, versions)]}
    except _Unkeyable:
        return None
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


# --- what a file holds -----------------------------------------------------------------------------------------------

class NotSerialisable(Exception):
    """A derived value holding something other than tensors and plain values (it stays in memory only)."""


def _encode(value: Any, tensors: list[torch.Tensor], device: torch.device) -> Any:
    """The JSON structure of a derived value; its tensors are appended to `tensors` and named by position."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.device.type == "meta":
            raise NotSerialisable(f"tensor of type {type(value).__name__} on {value.device}")
        if value.device != device and value.device.type != "cpu":
            raise NotSerialisable(f"tensor on {value.device}, its source weight on {device}")
        tensors.append(value)
        return {"tensor": str(len(tensors) - 1), "on": "base" if value.device == device else "cpu"}
    if value is None or isinstance(value, (bool, str)):
        return {"value": value}
    if isinstance(value, int):
        return {"int": str(value)}
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if type(value) in (tuple, list):
        return {type(value).__name__: [_encode(v, tensors, device) for v in value]}
    if type(value) is dict and all(isinstance(k, str) for k in value):
        return {"dict": [[k, _encode(v, tensors, device)] for k, v in value.items()]}
    raise NotSerialisable(type(value).__name__)


def _decode(s: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> Any:
    if "tensor" in s:
        t = tensors[s["tensor"]]
        return t.to(device) if s["on"] == "base" else t
    ((kind, v),) = s.items()
    if kind == "value":
        return v
    if kind == "int":
        return int(v)
    if kind == "float":
        return float(v)
    if kind == "dtype":
        return getattr(torch, v)
    if kind in ("tuple", "list"):
        items = [_decode(x, tensors, device) for x in v]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _decode(x, tensors, device) for k, x in v}
    raise ValueError(f"unknown structure {kind!r}")


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(_raw_bytes(t)).hexdigest()[:32]


class _Corrupt(Exception):
    pass


@dataclasses.dataclass
class Entry:
    """One file of the store, as `llmcompress cache ls` shows it."""

    key: str
    pass_name: str
    weights: str
    bytes: int
    created: str
    path: Path


class WeightStore:
    """Derived weights in one folder; see the module docstring."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str, device: torch.device) -> Any:
        """The stored value (tensors on `device` where they were on the source weight's device), else `MISSING`.
        A file that fails any check is deleted with one `DiskCacheWarning`."""
        path = self.path(key)
        if not path.is_file():
            return MISSING
        try:
            return self._read(path, key, device)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, the weight is computed again
            warnings.warn(f"llmcompress: ignoring derived-weight cache file {path} ({type(e).__name__}: {e}); it "
                          "is deleted and the weight computed again", DiskCacheWarning, stacklevel=2)
            path.unlink(missing_ok=True)
            return MISSING

    def _read(self, path: Path, key: str, device: torch.device) -> Any:
        from safetensors.torch import load

        # One read of the whole file: safe_open parses the header from one open and then maps the data by path
        # again (UntypedStorage.from_file), so a writer's os.replace in between paired one file's header and
        # checksums with another's tensors (seen in test_concurrent_writers_never_leave_a_torn_file).
        data = path.read_bytes()
        if len(data) < 8:
            raise _Corrupt(f"{len(data)} bytes, shorter than a safetensors header")
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
            raise _Corrupt(f"format {meta.get('format')!r} version {meta.get('format_version')!r}, expected "
                           f"{FORMAT!r} version {FORMAT_VERSION}")
        if meta.get("key") != key:
            raise _Corrupt(f"header key {meta.get('key')!r} is not the file's key")
        structure = json.loads(meta["structure"])
        checksums = json.loads(meta["checksums"])
        tensors = load(data)
        if set(tensors) != set(checksums):
            raise _Corrupt(f"tensors {sorted(tensors)} but checksums for {sorted(checksums)}")
        for name, t in tensors.items():
            if _checksum(t) != checksums[name]:
                raise _Corrupt(f"checksum of tensor {name} does not match")
        return _decode(structure, tensors, device)

    def save(self, key: str, value: Any, device: torch.device, info: dict[str, str]) -> bool:
        """Write `value` under `key` atomically; False (nothing written) when it is not serialisable. An OSError
        (read-only or full disk) is warned about and also gives False: the compile goes on."""
        from safetensors.torch import save

        tensors: list[torch.Tensor] = []
        try:
            structure = _encode(value, tensors, device)
        except NotSerialisable:
            return False
        named: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for i, t in enumerate(tensors):
            t = t.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages or ptr == 0:  # safetensors refuses tensors sharing memory
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            named[str(i)] = t
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "key": key,
                    "structure": json.dumps(structure),
                    "checksums": json.dumps({n: _checksum(t) for n, t in named.items()}),
                    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "llmcompress": __version__, **info}
        try:
            data = save(named, metadata=metadata)
        except (ValueError, TypeError, RuntimeError):  # a dtype safetensors cannot store
            return False
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            warnings.warn(f"llmcompress: cannot write the derived-weight cache file {path} ({e}); the weight is kept "
                          f"in memory only (set {ENV_SWITCH}=0 to stop trying)", DiskCacheWarning, stacklevel=2)
            return False
        return True

    def entries(self) -> Iterator[Entry]:
        """Every stored file, oldest first; a file whose header cannot be read is listed as `?`."""
        from safetensors import safe_open

        found = []
        for path in self.root.glob("*/*.safetensors"):
            if path.name.startswith(".tmp-"):
                continue
            try:
                size = path.stat().st_size
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
            except Exception:  # noqa: BLE001 - listed as unreadable; the next load deletes it
                meta = {}
            found.append(Entry(path.stem, meta.get("pass", "?"), meta.get("weights", "?"), size,
                               meta.get("created", "?"), path))
        return iter(sorted(found, key=lambda e: (e.created, e.key)))

    def clear(self) -> tuple[int, int]:
        """Delete every file of the store (temporary files of interrupted writes too): (files, bytes)."""
        count = size = 0
        for path in list(self.root.glob("*/*.safetensors")):
            try:
                n = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            count, size = count + 1, size + n
        for folder in list(self.root.glob("*")):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return count, size
