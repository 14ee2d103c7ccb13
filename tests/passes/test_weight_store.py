"""Tests for llmcompress/passes/weight_store.py and the disk layer of `FrozenWeights.derive`: values round-trip
bit for bit, keys follow content (never identity), bad files are detected, warned about, deleted and recomputed,
concurrent writers never leave a torn file, and the switches turn it off."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from llmcompress.errors import DiskCacheWarning, OptionError
from llmcompress.passes import weight_store as ws
from llmcompress.passes.base import Pass
from llmcompress.passes.weights import DERIVED, FrozenWeight, FrozenWeights

CPU = torch.device("cpu")


def _value(seed=0):
    """A derived value of every kind the store keeps: awkward shapes, several dtypes, random (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 53, generator=g)
    return (
        torch.randint(0, 256, (37, 27), dtype=torch.uint8, generator=g),
        w.to(torch.bfloat16),
        w.to(torch.float16)[:, :5],  # a view: stored as its own contiguous copy
        w.to(torch.float8_e4m3fn),
        [torch.randint(-128, 127, (7,), dtype=torch.int8, generator=g), w > 0, 3, 2.5, "gptq", None, True],
        {"scale": w.double()[0], "dtype": torch.bfloat16, "n": -1},
    )


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8)
                        if b.dtype.itemsize == 1 else b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def test_round_trip_is_bitwise(tmp_path):
    store = ws.WeightStore(tmp_path)
    value = _value()
    assert store.save("ab" * 16, value, CPU, {"pass": "p", "weights": "w"})
    loaded = store.load("ab" * 16, CPU)
    assert _equal(value, loaded)
    assert not _equal(value, _value(seed=1))  # the comparison can fail
    assert store.load("cd" * 16, CPU) is ws.MISSING


def test_tensors_sharing_storage_are_stored(tmp_path):
    store = ws.WeightStore(tmp_path)
    base = torch.randn(6, 10)
    value = (base[:3], base[3:], base)
    assert store.save("ef" * 16, value, CPU, {})
    assert _equal(value, store.load("ef" * 16, CPU))


@pytest.mark.parametrize("value", [object(), (torch.randn(3), object()), {1: torch.randn(2)},
                                   torch.randn(2, device="meta")], ids=["object", "tuple-object", "int-key", "meta"])
def test_values_that_are_not_serialisable_are_not_stored(tmp_path, value):
    store = ws.WeightStore(tmp_path)
    assert not store.save("01" * 16, value, CPU, {})
    assert not list(tmp_path.rglob("*.safetensors"))


def _corrupt_tensor_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_key(path):
    path.rename(path.with_name("22" * 16 + ".safetensors"))
    path.parent.rename(path.parent.with_name("22"))


def _not_safetensors(path):
    path.write_bytes(b"\x80\x04not a safetensors file")


@pytest.mark.parametrize("damage", [_corrupt_tensor_byte, _truncate, _other_key, _not_safetensors])
def test_bad_files_warn_once_are_deleted_and_miss(tmp_path, damage):
    store = ws.WeightStore(tmp_path)
    key = "11" * 16
    store.save(key, _value(), CPU, {})
    damage(store.path(key))
    key = "22" * 16 if damage is _other_key else key
    with pytest.warns(DiskCacheWarning, match="ignoring derived-weight cache file") as record:
        assert store.load(key, CPU) is ws.MISSING
    assert len([w for w in record if issubclass(w.category, DiskCacheWarning)]) == 1
    assert not store.path(key).exists()


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    """Eight threads write the same key (each its own value) while a reader loads it: every load is one writer's
    value, whole, and no warning (a torn file would fail its checksum) and no temporary file is left."""
    store = ws.WeightStore(tmp_path)
    key = "33" * 16
    values = [(torch.randn(256, 1031, generator=torch.Generator().manual_seed(i)), i) for i in range(8)]
    store.save(key, values[0], CPU, {})
    stop = threading.Event()
    seen, errors = [], []

    def write(v):
        for _ in range(6):
            store.save(key, v, CPU, {})

    def read():
        while not stop.is_set():
            try:
                got = store.load(key, CPU)
            except DiskCacheWarning as e:  # raised: the filter below makes it an error
                errors.append(f"torn file: {e}")
                continue
            if got is ws.MISSING:
                errors.append("missing")
                continue
            seen.append(got[1])
            if not torch.equal(got[0], values[got[1]][0]):
                errors.append(f"value of writer {got[1]} differs")

    with warnings.catch_warnings():
        warnings.simplefilter("error", DiskCacheWarning)
        reader = threading.Thread(target=read)
        reader.start()
        writers = [threading.Thread(target=write, args=(v,)) for v in values]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        reader.join()
    assert not errors, errors[:3]
    assert seen
    assert [p.name for p in tmp_path.rglob("*")] == [key[:2], f"{key}.safetensors"]


def test_content_hash_follows_bytes_dtype_shape_and_version():
    a = torch.randn(5, 7)
    h = ws.content_hash(a, a._version)
    assert ws.content_hash(a.clone(), 0) == h  # content, not identity
    assert ws.content_hash(a.reshape(7, 5), 0) != h
    assert ws.content_hash(a.view(torch.int32), 0) != h  # same bytes, other dtype
    a.add_(1)
    assert ws.content_hash(a, a._version) != h  # recomputed for the new version
    assert ws.content_hash(a, a._version) == ws.content_hash(a.clone(), 0)


def test_entry_key_does_not_depend_on_the_process():
    """Two processes with different string hash seeds (frozenset order) give the same key."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch; from llmcompress.passes.weight_store import entry_key; "
            "print(entry_key('0123456789abcdef', (frozenset({'q_proj', 'k_proj', 'v_proj', 'o', 'p'}), 'w4a16'), "
            "[torch.arange(12.).reshape(3, 4)], [0], ()))")
    root = Path(__file__).resolve().parents[2]
    keys = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}).stdout.strip()
            for seed in ("1", "2")}
    assert len(keys) == 1 and len(keys.pop()) == 32


def test_entry_key_is_stable_and_covers_every_input():
    w = torch.randn(4, 8)
    parts = ("w4a16", "gptq", 32, 0.5, frozenset({"b", "a", "c"}), torch.bfloat16)
    key = ws.entry_key("0123456789abcdef", parts, [w], [0], ())
    assert key == ws.entry_key("0123456789abcdef", parts, [w.clone()], [0], ())
    # frozensets hash strings in a per-process order: the key must not depend on it
    assert key == ws.entry_key("0123456789abcdef", (*parts[:4], frozenset({"c", "a", "b"}), parts[5]), [w], [0], ())
    others = [ws.entry_key("fedcba9876543210", parts, [w], [0], ()),
              ws.entry_key("0123456789abcdef", parts[:-1], [w], [0], ()),
              ws.entry_key("0123456789abcdef", (*parts[:2], 32.0, *parts[3:]), [w], [0], ()),
              ws.entry_key("0123456789abcdef", parts, [w + 1], [0], ()),
              ws.entry_key("0123456789abcdef", parts, [w], [0], (("aten.t.default", ()),))]
    assert len({key, *others}) == 6
    assert ws.entry_key("0123456789abcdef", (object(),), [w], [0], ()) is None


@pytest.mark.parametrize("raw,option,expected", [(None, True, True), (None, False, False), ("0", True, False),
                                                 ("off", True, False), ("1", True, True), ("yes", False, False)])
def test_switches(monkeypatch, raw, option, expected):
    if raw is None:
        monkeypatch.delenv(ws.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(ws.ENV_SWITCH, raw)
    assert ws.disk_cache_enabled(option) is expected
    assert (ws.open_store(option) is None) is not expected


def test_bad_switch_value_says_what_is_allowed(monkeypatch):
    monkeypatch.setenv(ws.ENV_SWITCH, "maybe")
    with pytest.raises(OptionError, match=r"LLMCOMPRESS_DISK_CACHE='maybe'.*0, 1, false, true"):
        ws.disk_cache_enabled(True)


def test_cache_root_honours_env_and_xdg(monkeypatch, tmp_path):
    from llmcompress.cache_dir import cache_root

    monkeypatch.delenv("LLMCOMPRESS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llmcompress"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_root().parts[-2:] == (".cache", "llmcompress")
    monkeypatch.setenv("LLMCOMPRESS_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert ws.weights_dir() == tmp_path / "c" / "weights"


# --- through FrozenWeights.derive -------------------------------------------------------------------------------------

class _Probe(Pass):
    name = "probe-derive"


def _frozen(tensors, store):
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    nodes = []
    for i, t in enumerate(tensors):
        gm.register_buffer(f"w{i}", t)
        nodes.append(gm.graph.get_attr(f"w{i}"))
    weights = FrozenWeights(gm, [FrozenWeight(f"w{i}", f"model.w{i}", t) for i, t in enumerate(tensors)], store)
    return weights, nodes


def test_derive_persists_only_when_asked_and_loads_in_a_fresh_identity(tmp_path):
    store = ws.WeightStore(tmp_path)
    calls = []

    def fn(w):
        calls.append(1)
        return (w * 2).to(torch.bfloat16), w.sum()

    key = _Probe().cache_key("x", 1)
    w = torch.randn(9, 13)
    weights, (n,) = _frozen([w], store)
    before = DERIVED.counters()
    weights.derive(n, key, fn)  # persist=False: memory only
    assert not list(tmp_path.rglob("*.safetensors"))
    first = weights.derive(n, _Probe().cache_key("x", 2), fn, persist=True)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    # Another "process": the same content in new tensors (new identities, the in-memory cache misses).
    weights2, (n2,) = _frozen([w.clone()], store)
    again = weights2.derive(n2, _Probe().cache_key("x", 2), fn, persist=True)
    assert len(calls) == 2 and _equal(first, again)
    assert weights2.cached(n2, _Probe().cache_key("x", 2)) is again  # now in memory
    after = DERIVED.counters()
    assert {k: after[k] - before[k] for k in after} == {"hits": 0, "misses": 2, "disk_hits": 1, "disk_writes": 1,
                                                        "not_persisted": 0}
    # `cached` looks on disk too (a graph that cannot calibrate uses another process's results)
    weights3, (n3,) = _frozen([w.clone()], store)
    assert _equal(weights3.cached(n3, _Probe().cache_key("x", 2)), first)
    # Another weight anywhere in the graph changes the key: a calibrated layer depends on the layers before it.
    weights4, (n4, _) = _frozen([w.clone(), torch.randn(3)], store)
    assert weights4.cached(n4, _Probe().cache_key("x", 2)) is None


def test_derive_counts_values_it_cannot_persist(tmp_path):
    weights, (n,) = _frozen([torch.randn(4, 4)], ws.WeightStore(tmp_path))
    before = DERIVED.not_persisted
    weights.derive(n, _Probe().cache_key("object"), lambda w: object(), persist=True)
    assert DERIVED.not_persisted == before + 1
    assert not list(tmp_path.rglob("*.safetensors"))


def test_corrupt_entry_is_recomputed_and_rewritten(tmp_path):
    store = ws.WeightStore(tmp_path)
    w = torch.randn(8, 8)
    key = _Probe().cache_key("c")
    weights, (n,) = _frozen([w], store)
    good = weights.derive(n, key, lambda t: t.exp(), persist=True)
    (path,) = tmp_path.rglob("*.safetensors")
    _corrupt_tensor_byte(path)
    weights2, (n2,) = _frozen([w.clone()], store)
    with pytest.warns(DiskCacheWarning):
        again = weights2.derive(n2, key, lambda t: t.exp(), persist=True)
    assert torch.equal(good, again)
    weights3, (n3,) = _frozen([w.clone()], store)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiskCacheWarning)
        assert torch.equal(weights3.cached(n3, key), good)  # the rewritten file is whole


def test_hashing_a_weight_leaves_it_releasable():
    """`content_hash` reads the bytes without `Tensor.numpy()`, which would mark the storage not resizable for good
    (release_weights then fails on it); the digest is the one of the bytes, contiguous or not."""
    import hashlib

    from llmcompress.passes.weight_store import content_hash

    w = torch.randn(6, 5)
    for t in (w, w.T):
        digest = content_hash(t, 0)
        assert digest == hashlib.sha256(f"float32{tuple(t.shape)};".encode()
                                        + t.contiguous().view(torch.uint8).reshape(-1).clone().numpy().tobytes()
                                        ).hexdigest()
    assert w.untyped_storage().resizable()
    w.untyped_storage().resize_(0)  # what release_weights does
