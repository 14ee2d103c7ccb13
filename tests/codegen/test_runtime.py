"""The `llmcompress::fused` op (eager, traced, under Inductor, fake), `insert_call`, the source cache and the cost."""

from __future__ import annotations

import operator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from llmcompress.codegen import CodegenError, compile_group, get_kernel
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.passes.fusion.fused_call import insert_call
from llmcompress.testing.devices import DEVICE, needs_triton

aten = torch.ops.aten
fused = torch.ops.llmcompress.fused.default


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEVICE, dtype)


def rms_norm(x, w):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * h.to(x.dtype)


def _rms_kernel(dtype=torch.float32, mode="fake", **kw):
    x, w = _rand(3, 5, 48, dtype=dtype), _rand(48, dtype=dtype, seed=1)
    gm = make_fx(rms_norm, tracing_mode=mode)(x, w)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not aten.sym_size.int]
    return compile_group(nodes, **kw), x, w


@needs_triton
def test_op_eager_matches_kernel_and_reference():
    kernel, x, w = _rms_kernel()
    assert [n.name for n in kernel.inputs] == ["x_1", "w_1"]
    out = torch.ops.llmcompress.fused(kernel.key, [x, w])
    assert len(out) == 1 and out[0].is_contiguous()
    torch.testing.assert_close(out[0], rms_norm(x, w))
    torch.testing.assert_close(out[0], kernel.reference(x, w)[0])
    assert get_kernel(kernel.key) is kernel


def test_get_kernel_unknown_key_says_why():
    with pytest.raises(KeyError, match="another process"):
        get_kernel("nope")


@needs_triton
def test_op_inside_make_fx_graph():
    kernel, x, w = _rms_kernel()

    def fn(x, w):
        return torch.ops.llmcompress.fused(kernel.key, [x, w])[0] * 2

    gm = make_fx(fn)(x, w)
    assert any(n.target is fused for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x, w), rms_norm(x, w) * 2)


@needs_triton
def test_op_under_inductor():
    kernel, x, w = _rms_kernel()

    def fn(x, w):
        return torch.ops.llmcompress.fused(kernel.key, [x + 1, w])[0] - 1

    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), rms_norm(x + 1, w) - 1)


def test_fake_impl_with_symbolic_shapes():
    kernel, x, w = _rms_kernel(mode="symbolic")
    mode = FakeTensorMode(shape_env=ShapeEnv())
    fx, fw = mode.from_tensor(_rand(4, 6, 48)), mode.from_tensor(_rand(48, seed=1))
    with mode:
        (out,) = torch.ops.llmcompress.fused(kernel.key, [fx, fw])
    assert isinstance(out.shape[0], torch.SymInt) and out.dtype == torch.float32
    assert out.stride()[-1] == 1

    gm = make_fx(lambda x, w: torch.ops.llmcompress.fused(kernel.key, [x, w])[0], tracing_mode="symbolic")(
        _rand(4, 6, 48), _rand(48, seed=1))
    call = next(n for n in gm.graph.nodes if n.target is fused)
    assert any(isinstance(s, torch.SymInt) for s in call.meta["val"][0].shape)


@needs_triton
def test_insert_call_rewrites_the_graph():
    def fn(x, w, m):
        h = x + 1  # stays outside the group
        y = rms_norm(h, w)
        return y @ m, y.sum()

    x, w, m = _rand(3, 5, 48), _rand(48, seed=1), _rand(48, 8, seed=2)
    gm = make_fx(fn, tracing_mode="fake")(x, w, m)
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    group = [n for n in ops if n.target in (aten._to_copy.default, aten.pow.Tensor_Scalar, aten.mean.dim,
                                            aten.rsqrt.default) or (n.target in (aten.mul.Tensor, aten.add.Tensor)
                                                                     and n is not ops[0])]
    kernel = compile_group(group, name_hint="rms norm")
    results = insert_call(gm, kernel)
    gm.graph.lint()
    gm.recompile()
    calls = [n for n in gm.graph.nodes if n.target is fused]
    assert len(calls) == 1 and len(results) == 1 and results[0].target is operator.getitem
    assert not any(n.target in (aten.rsqrt.default, aten.mean.dim) for n in gm.graph.nodes)
    assert results[0].meta["val"].shape == (3, 5, 48)
    for got, expected in zip(gm(x, w, m), fn(x, w, m)):
        torch.testing.assert_close(got, expected)
    assert kernel.name == "rms_norm"


def test_insert_call_refuses_a_group_that_is_not_convex():
    def fn(x):
        a = x * 2
        b = a.sum(-1, keepdim=True).exp()  # outside: reads a, feeds c
        return a + b

    gm = make_fx(fn, tracing_mode="fake")(torch.randn(4, 8))
    mul, s, e, add = [n for n in gm.graph.nodes if n.op == "call_function"]
    kernel = compile_group([mul, add])
    with pytest.raises(CodegenError, match="not convex"):
        insert_call(gm, kernel)


def test_cost_of_the_fused_call():
    kernel, x, w = _rms_kernel()
    gm = make_fx(lambda x, w: torch.ops.llmcompress.fused(kernel.key, [x, w])[0], tracing_mode="fake")(x, w)
    call = next(n for n in gm.graph.nodes if n.target is fused)
    cost = CostModel(HARDWARE["h100-sxm"]).estimate(call)
    assert cost.kind == "custom"
    # pow, mean (over its input), 2 muls over 3x5x48; add and rsqrt over 3x5x1; x and w read, y written.
    assert cost.flops == 4 * 720 + 2 * 15
    assert cost.bytes == 720 * 4 + 48 * 4 + 720 * 4 == kernel.bytes


def test_cache_same_group_same_file_no_rewrite(tmp_path):
    k1, _, _ = _rms_kernel(cache_dir=tmp_path)
    mtime = k1.source_path.stat().st_mtime_ns
    k2, _, _ = _rms_kernel(cache_dir=tmp_path)
    assert k1.key == k2.key and k1.source_path == k2.source_path and k1.source_path.parent == tmp_path
    assert k2.source_path.stat().st_mtime_ns == mtime
    assert k1.source_path.read_text() == k1.source
    k3, _, _ = _rms_kernel(dtype=torch.bfloat16, cache_dir=tmp_path)
    assert k3.key != k1.key and len(list(tmp_path.glob("fused_*.py"))) == 2


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMPRESS_CACHE_DIR", str(tmp_path))
    kernel, _, _ = _rms_kernel()
    assert kernel.source_path.parent == tmp_path / "kernels"


def test_dump_dir_writes_a_readable_copy(tmp_path):
    kernel, _, _ = _rms_kernel(dump_dir=tmp_path, name_hint="rms_norm")
    kernel2, _, _ = _rms_kernel(dump_dir=tmp_path, name_hint="rms_norm")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["fused_000_rms_norm.py", "fused_001_rms_norm.py"]
    text = (tmp_path / files[0]).read_text()
    assert "# FX nodes:" in text and "%rsqrt : " in text and "aten.rsqrt.default" in text
    assert text.endswith(kernel.source)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    kernel, x, w = _rms_kernel()
    x, w = x.cpu(), w.cpu()
    monkeypatch.setattr(kernel, "compiled", True)  # as on a CPU without TRITON_INTERPRET
    monkeypatch.setattr(kernel.module, "fused_kernel", None)  # never launched
    (out,) = torch.ops.llmcompress.fused(kernel.key, [x, w])
    torch.testing.assert_close(out, rms_norm(x, w))


@needs_triton
def test_dynamic_row_too_wide_for_one_block_runs_the_reference_with_a_warning():
    x = _rand(2, 64)
    gm = make_fx(lambda x: torch.softmax(x * 2, -1), tracing_mode="symbolic")(x)
    kernel = compile_group([n for n in gm.graph.nodes if n.op == "call_function" and n.target is not aten.sym_size.int])
    wide = _rand(2, 20000, seed=1)
    with pytest.warns(UserWarning, match="20000 columns with a reduction"):
        (out,) = kernel(wide)
    torch.testing.assert_close(out, torch.softmax(wide * 2, -1))


def test_wrong_inputs_raise_one_clear_error():
    kernel, x, w = _rms_kernel()
    with pytest.raises(ValueError, match="takes 2 tensors, got 1"):
        kernel(x)
    with pytest.raises(ValueError, match="input 0 must be a 3-d torch.float32 tensor"):
        kernel(x.double(), w)
    with pytest.raises(ValueError, match="input 1 must be a 1-d torch.float32 tensor"):
        kernel(x, w.unsqueeze(0))


def _rms_norm_float64(x, w):
    h = x.double()
    return w.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int32])
def test_another_dtype_of_a_shape_already_run_is_refused(dtype):
    """The launch plan is cached per shape: a later call of that shape in another dtype must still be checked (the
    kernel's source is typed for float32; it returned float32, or for int32 wrong values), by the op's fake too."""
    kernel, x, w = _rms_kernel()
    (out,) = torch.ops.llmcompress.fused(kernel.key, [x, w])
    torch.testing.assert_close(out, _rms_norm_float64(x, w).float(), atol=2e-6, rtol=2e-6)
    other = [(x * 4).to(dtype), (w * 4).to(dtype)]  # same shapes and strides
    message = f"input 0 must be a 3-d torch.float32 tensor on {x.device} .* got {dtype}"
    with pytest.raises(ValueError, match=message):
        torch.ops.llmcompress.fused(kernel.key, other)
    with pytest.raises(ValueError, match="input 1 must be a 1-d torch.float32 tensor"):
        kernel(x, other[1])
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=message):
        torch.ops.llmcompress.fused(kernel.key, [mode.from_tensor(t) for t in other])
    (again,) = kernel(x, w)  # the float32 plan still serves
    torch.testing.assert_close(again, out, atol=0, rtol=0)


@needs_triton
def test_each_dtype_runs_its_own_kernel_on_one_shape():
    """Kernels of one group for float32, then bfloat16, float16, float64 inputs of the same shape: each returns its
    input dtype, within that dtype's rounding (two roundings: h, then the product) of a float64 oracle."""
    # float64 as float32: `rms_norm` normalises in float32 whatever the input dtype.
    tolerance = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 2e-6}
    for dtype, tol in tolerance.items():
        kernel, x, w = _rms_kernel(dtype=dtype)
        (out,) = torch.ops.llmcompress.fused(kernel.key, [x, w])
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), _rms_norm_float64(x, w), atol=tol, rtol=tol)


@needs_triton
def test_int32_kernel_after_a_float32_one_of_the_same_shape():
    def fn(x, y):
        return x * 3 + y * y - 7

    shapes = (5, 37)
    for dtype in (torch.float32, torch.int32):
        g = torch.Generator().manual_seed(2)
        x = torch.randint(-1000, 1000, shapes, generator=g).to(DEVICE, dtype)
        y = torch.randint(-1000, 1000, shapes, generator=g).to(DEVICE, dtype)
        gm = make_fx(fn, tracing_mode="fake")(x, y)
        kernel = compile_group([n for n in gm.graph.nodes if n.op == "call_function"])
        (out,) = kernel(x, y)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), fn(x.double(), y.double()), atol=0, rtol=0)  # exact in both
