"""Tests for llmcompress/kernels/quantized_embedding.py: the int8 / int4 embedding ops against their references
(dequantize the whole table, then F.embedding) and a float64 lookup, their errors, Inductor, and their cost."""

from __future__ import annotations

import pytest
import torch

import llmcompress.kernels  # noqa: F401  (registers the ops)
from llmcompress.formats import quantized as formats
from llmcompress.kernels.quantized_embedding import embedding_w4_reference, embedding_w8_reference

E8 = torch.ops.llmcompress.embedding_w8.default
E4 = torch.ops.llmcompress.embedding_w4.default
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _table(v=37, d=96, seed=0):
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


def _ids(v=37, shape=(2, 5), dtype=torch.int64):
    ids = torch.randint(0, v, shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ids[0, 0] = ids[1, 1] = v - 1  # repeated ids, the last row
    return ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_embedding_w8_matches_references(dtype, ids_dtype):
    q, s = formats.quantize_int8_per_channel(_table())
    ids = _ids(dtype=ids_dtype)
    y = E8(ids, q, s, dtype)
    assert y.shape == (2, 5, 96) and y.dtype == dtype
    torch.testing.assert_close(y, embedding_w8_reference(ids, q, s, dtype), atol=0, rtol=0)
    ref64 = (q.double() * s.double()[:, None])[ids.long()]
    torch.testing.assert_close(y.double(), ref64.to(dtype).double(), atol=0, rtol=0)  # one rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,d", [(32, 96), (64, 192), (128, 384)])
def test_embedding_w4_matches_references(dtype, group_size, d):
    q, s, z = formats.quantize_int4_rtn(_table(d=d), group_size)
    ids = _ids()
    y = E4(ids, q, s, z, group_size, dtype)
    assert y.shape == (2, 5, d) and y.dtype == dtype
    torch.testing.assert_close(y, embedding_w4_reference(ids, q, s, z, group_size, dtype), atol=0, rtol=0)
    codes = formats.unpack_int4(q).double()
    w64 = (codes - z.double().repeat_interleave(group_size, 1)) * s.double().repeat_interleave(group_size, 1)
    torch.testing.assert_close(y.double(), w64[ids].to(dtype).double(), atol=0, rtol=0)


def test_errors_say_what_is_allowed():
    q, s = formats.quantize_int8_per_channel(_table())
    with pytest.raises(ValueError, match="ids must be int64 or int32"):
        E8(_ids().float(), q, s, torch.float32)
    with pytest.raises(ValueError, match="out_dtype must be float32, bfloat16 or float16"):
        E8(_ids(), q, s, torch.float64)
    with pytest.raises(ValueError, match=r"scale must be float32 \(V,\)"):
        E8(_ids(), q, s.half(), torch.float32)
    q4, s4, z4 = formats.quantize_int4_rtn(_table(), 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        E4(_ids(), q4, s4, z4, 48, torch.float32)
    with pytest.raises(ValueError, match=r"zeros must be float16 \(V, D // group_size\)"):
        E4(_ids(), q4, s4, z4.float(), 32, torch.float32)


def test_inductor_inlines_the_lookup():
    q, s, z = formats.quantize_int4_rtn(_table(), 32)
    ids = _ids()
    compiled = torch.compile(lambda i: E4(i, q, s, z, 32, torch.bfloat16) * 2, backend="inductor")
    torch.testing.assert_close(compiled(ids), E4(ids, q, s, z, 32, torch.bfloat16) * 2, atol=0, rtol=0)


def test_cost_counts_the_rows_read():
    """A gather of M ids reads M rows of each table at their stored width, not the table."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmcompress.cost.hardware import HARDWARE
    from llmcompress.cost.roofline import CostModel

    v, d, m = 32000, 2048, 3
    with FakeTensorMode():
        ids = torch.empty(1, m, dtype=torch.int64)
        q, s = torch.empty(v, d, dtype=torch.int8), torch.empty(v, dtype=torch.float32)
        g = make_fx(lambda i, q, s: E8(i, q, s, torch.bfloat16), tracing_mode="fake")(ids, q, s)
    (cost,) = [CostModel(HARDWARE["cpu"]).node_cost(n) for n in g.graph.nodes if n.target is E8]
    assert int(cost.bytes) == m * 8 + m * d * 2 + m * (d + 4)
