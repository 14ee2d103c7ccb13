"""Hand-written groups from real models: numerics against eager and the structure of the generated source; dynamic
shapes; refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from llmcompress.codegen import CodegenError, compile_group, fusible, is_reduction
from llmcompress.testing.devices import DEVICE, needs_triton

aten = torch.ops.aten

# assert_close's defaults per dtype, which the generator aims at (it rounds every node like aten does).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g)).to(DEVICE, dtype)


def _trace(fn, *inputs, mode="fake"):
    gm = make_fx(fn, tracing_mode=mode)(*inputs)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not aten.sym_size.int]
    return gm, nodes


def _run(fn, *inputs, mode="fake"):
    """Trace fn, compile all its ops as one group, run the kernel; returns (kernel, outputs in fn's order)."""
    gm, nodes = _trace(fn, *inputs, mode=mode)
    kernel = compile_group(nodes)
    by_placeholder = dict(zip(gm.graph.find_nodes(op="placeholder"), inputs))
    got = dict(zip(kernel.outputs, kernel(*[by_placeholder[x] for x in kernel.inputs])))
    outs = gm.graph.find_nodes(op="output")[0].args[0]
    return kernel, [got[o] for o in outs]


def _check(fn, *inputs, mode="fake", **tol):
    kernel, got = _run(fn, *inputs, mode=mode)
    expected = fn(*inputs)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, **tol)
    return kernel


def llama_rms_norm(x, w):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (w * h.to(x.dtype),)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_rms_norm(dtype):
    x, w = _rand(3, 5, 123, dtype=dtype), _rand(123, dtype=dtype, seed=1, scale=0.5, offset=1.0)
    kernel = _check(llama_rms_norm, x, w)
    assert kernel.source.count("tl.sum(") == 1
    assert "fused_kernel" in kernel.source and len(kernel.outputs) == 1


@needs_triton
def test_residual_add_then_rms_norm_two_outputs():
    def fn(h, r, w):
        s = r + h
        return s, *llama_rms_norm(s, w)

    x, r, w = (_rand(2, 7, 96, dtype=torch.bfloat16, seed=i) for i in range(3))
    kernel = _check(fn, x, r, w)
    assert len(kernel.outputs) == 2 and kernel.source.count("tl.store(") == 2


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    kernel = _check(lambda g, u: (F.silu(g) * u,), _rand(4, 11, 96, dtype=dtype), _rand(4, 11, 96, dtype=dtype, seed=1))
    assert "tl.sum" not in kernel.source


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_with_bias(dtype):
    _check(lambda x, b: (F.gelu(x + b, approximate="tanh"),), _rand(6, 200, dtype=dtype, scale=3.0),
           _rand(200, dtype=dtype, seed=1))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_pos_emb_on_transposed_q(dtype):
    """HF's apply_rotary_pos_emb on q = linear output viewed (B, S, H, D) and transposed, cos/sin broadcast over
    heads: the view, transpose and unsqueeze become strides of the loads, the cat a where between column ranges."""
    b, s, h, d = 2, 5, 3, 16

    def fn(q_lin, cos, sin):
        q = q_lin.view(b, s, h, d).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (q * cos) + (rotate_half(q) * sin),

    kernel = _check(fn, _rand(b, s, h * d, dtype=dtype), _rand(1, s, d, dtype=dtype, seed=1),
                    _rand(1, s, d, dtype=dtype, seed=2))
    assert len(kernel.inputs) == 3  # the linear output itself: no copy of the transposed view
    assert "tl.where(" in kernel.source and "tl.sum" not in kernel.source


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_with_mask_add(dtype):
    def fn(scores, mask):
        return (torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(scores.dtype),)

    mask = torch.triu(torch.full((7, 9), float("-inf")), diagonal=3).expand(2, 1, 7, 9).to(DEVICE, dtype)
    kernel = _check(fn, _rand(2, 3, 7, 9, dtype=dtype, scale=3.0), mask)
    assert kernel.source.count("tl.max(") == 1 and kernel.source.count("tl.sum(") == 1


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype):
    def fn(x, w, b):
        return (F.layer_norm(x, x.shape[-1:], w, b, 1e-5),)

    _check(fn, _rand(3, 4, 77, dtype=dtype, scale=2.0, offset=0.5), _rand(77, dtype=dtype, seed=1),
           _rand(77, dtype=dtype, seed=2))


@needs_triton
def test_layer_norm_mean_and_rstd_outputs():
    def fn(x, w, b):
        return aten.native_layer_norm(x, [x.shape[-1]], w, b, 1e-5)

    kernel = _check(fn, _rand(5, 33, offset=1.0), _rand(33, seed=1), _rand(33, seed=2))
    assert len(kernel.outputs) == 3


@needs_triton
def test_integer_and_bool_values():
    def fn(pos, x):
        keep = (pos > 3) & (x > 0)  # an int64 compare, a bool and
        return torch.where(keep, x, pos.to(x.dtype) * 0.5), keep

    pos = torch.arange(37, device=DEVICE).expand(4, 37)
    _check(fn, pos.contiguous(), _rand(4, 37))


@needs_triton
def test_dynamic_shapes_reuse_the_source():
    """A kernel compiled from a symbolic trace runs new row counts and last-dim sizes: only BLOCK_C changes."""
    x, w = _rand(2, 3, 40), _rand(40, seed=1)
    gm, nodes = _trace(llama_rms_norm, x, w, mode="symbolic")
    kernel = compile_group(nodes)
    source = kernel.source
    for shape in [(2, 3, 40), (5, 7, 40), (1, 9, 200), (3, 1, 7)]:
        x, w = _rand(*shape, seed=3), _rand(shape[-1], seed=4)
        torch.testing.assert_close(kernel(x, w)[0], llama_rms_norm(x, w)[0])
    assert kernel.source == source
    assert {p.blocks["BLOCK_C"] for p in kernel._plans.values()} == {64, 256, 8}


@needs_triton
def test_static_kernel_runs_other_row_counts():
    x, w = _rand(2, 3, 40), _rand(40, seed=1)
    _, nodes = _trace(llama_rms_norm, x, w)
    kernel = compile_group(nodes)
    x = _rand(6, 1, 40, seed=2)
    torch.testing.assert_close(kernel(x, w)[0], llama_rms_norm(x, w)[0])


@needs_triton
def test_broadcast_rows_output_written_once_per_element():
    """An output that broadcasts over the group's rows (here (1, N) from a weight-only chain) is stored at its own
    shape."""
    def fn(x, w):
        ww = torch.sigmoid(w) * 2
        return x * ww, ww

    _check(fn, _rand(9, 130), _rand(1, 130, seed=1))


@needs_triton
def test_wide_pointwise_group_tiles_columns():
    kernel, _ = _run(lambda x: (torch.tanh(x) * 3,), _rand(2, 3000))
    assert max(p.grid[1] for p in kernel._plans.values()) > 1
    _check(lambda x: (torch.tanh(x) * 3,), _rand(2, 3000))


# -- refusals ---------------------------------------------------------------------------------------------------


def _nodes(fn, *shapes):
    return _trace(fn, *[torch.empty(s) for s in shapes])[1]


def test_refuses_unsupported_op():
    nodes = _nodes(lambda x: (torch.sort(x, -1).values + 1,), (4, 8))
    sort = next(n for n in nodes if n.target is aten.sort.default)
    assert fusible(sort) == "unsupported op aten.sort.default"
    with pytest.raises(CodegenError, match="unsupported op aten.sort.default"):
        compile_group(nodes)


def test_refuses_reduction_over_a_leading_dim():
    nodes = _nodes(lambda x: (x.sum(1, keepdim=True) * 2,), (4, 8, 3))
    red = next(n for n in nodes if n.target is aten.sum.dim_IntList)
    assert "only the last dim" in fusible(red) and not is_reduction(nodes[-1])
    with pytest.raises(CodegenError, match="only the last dim"):
        compile_group(nodes)


def test_refuses_reduction_without_keepdim():
    nodes = _nodes(lambda x: (x.sum(-1),), (4, 8))
    assert fusible(nodes[0]) == "reduction without keepdim"


def test_refuses_too_wide_row_with_reduction():
    nodes = _nodes(lambda x: (torch.softmax(x, -1),), (2, 20000))
    assert fusible(nodes[0]) is None and is_reduction(nodes[0])
    with pytest.raises(CodegenError, match="20000 columns"):
        compile_group(nodes)


def test_refuses_view_that_moves_rows_of_a_computed_value():
    nodes = _nodes(lambda x: ((x * 2).transpose(0, 1) + 1,), (4, 5, 8))
    with pytest.raises(CodegenError, match="moves its rows"):
        compile_group(nodes)


def test_refuses_rows_that_do_not_broadcast():
    nodes = _nodes(lambda x, y: (x * 2, y + 1), (4, 8), (3, 8))
    with pytest.raises(CodegenError, match="do not broadcast"):
        compile_group(nodes)


def test_refuses_group_without_outputs_and_cross_device():
    nodes = _nodes(lambda x: (x * 2,), (4, 8))
    gm_nodes = nodes[:0]
    with pytest.raises(CodegenError, match="empty group"):
        compile_group(gm_nodes)
