"""Every hand-written Triton kernel compiled ahead of time for sm_90 and sm_80 (llmcompress/testing/gpu_compile.py):
one config per kernel, dtype and target, the one with the most shared memory the launcher offers. A compile error,
shared memory over the target's per-block limit or over the launcher's estimate (which decides what is offered), or
a spill fails. Also: configs over the limit are never offered, and the fp8 launcher refuses sm_80."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from llmcompress.kernels import fp8_linear, fused_linear, int4_linear, int8_linear, rms_norm, w8a8_linear
from llmcompress.kernels import linear_common as common
from llmcompress.testing.gpu_compile import check_row, run_reduced

pytestmark = pytest.mark.gpu_compile

KERNEL_MODULES = (int8_linear, int4_linear, fused_linear, rms_norm, w8a8_linear, fp8_linear)
DTYPES = ("float16", "bfloat16", "float32")
TARGETS = ("sm_90", "sm_80")
# (family, kernel, variant) that the reduced set launches.
EXPECTED = [
    ("int8_linear", "_w8_gemv_kernel", ""), ("int8_linear", "_w8_gemm_kernel", ""),
    ("int8_linear", "_w8_dequant_kernel", "dequantize"),
    ("int4_linear", "_w4_gemv_kernel", "group 128"), ("int4_linear", "_w4_gemm_kernel", "group 128"),
    ("int4_linear", "_w4_dequant_kernel", "dequantize"),
    ("fused_linear", "_fused_gemv_kernel", "plain"), ("fused_linear", "_fused_gemm_kernel", "plain"),
    ("fused_linear", "_fused_gemv_kernel", "gated silu, rms, residual"),
    ("fused_linear", "_fused_gemm_kernel", "gated silu, rms, residual"),
    ("rms_norm", "_rms_norm_kernel", ""),
    ("w8a8_linear", "_quantize_per_token_int8_kernel", ""), ("w8a8_linear", "_scaled_mm_kernel", ""),
    ("fp8_linear", "_quantize_per_token_fp8_kernel", ""), ("fp8_linear", "_scaled_mm_kernel", ""),
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    return run_reduced("kernels", tmp_path_factory.mktemp("gpu_compile"))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family,kernel,variant", EXPECTED)
def test_kernel_compiles_for_the_gpu(rows, family, kernel, variant, dtype, target):
    found = [r for r in rows if (r["family"], r["kernel"], r["variant"], r["dtype"], r["target"])
             == (family, kernel, variant, dtype, target)]
    assert len(found) == 1, f"{len(found)} rows for {kernel} {variant} {dtype} {target}"
    row = found[0]
    if family == "fp8_linear" and target == "sm_80":
        assert "compute capability 8.0" in row["refused"] and "shared" not in row
        return
    check_row(row)


def test_every_kernel_is_compiled(rows):
    """A new @triton.jit kernel in these modules joins the set (its launcher must be called in gpu_compile.cases)."""
    defined = {(m.__name__.rsplit(".", 1)[1], name) for m in KERNEL_MODULES
               for name, obj in vars(m).items() if name.endswith("_kernel") and hasattr(obj, "fn")
               and inspect.getmodule(obj.fn) is m}
    compiled = {(r["family"], r["kernel"]) for r in rows}
    assert defined and defined <= compiled, f"not compiled: {sorted(defined - compiled)}"


def _sm80(monkeypatch):
    """A CUDA device of compute capability 8.0 (an A100), faked: no GPU here."""
    class Props:
        major, minor, shared_memory_per_block_optin = 8, 0, 166_912
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100 (faked)")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())


def test_fp8_launchers_refuse_sm_80(monkeypatch):
    _sm80(monkeypatch)
    with FakeTensorMode():
        x = torch.empty(3, 256, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(64, 256, dtype=torch.float8_e4m3fn, device="cuda")
        s = torch.empty(64, dtype=torch.float32, device="cuda")
        match = r"NVIDIA A100 \(faked\) \(cuda:0\) has compute capability 8\.0; .* >= 8\.9"
        with pytest.raises(fp8_linear.FP8UnsupportedError, match=match):
            fp8_linear.linear_fp8_triton(x, w, s)
        with pytest.raises(fp8_linear.FP8UnsupportedError, match=match):
            fp8_linear.quantize_per_token_fp8_triton(x)


@pytest.mark.parametrize("gated", [False, True])
def test_configs_over_the_shared_limit_are_not_offered(monkeypatch, gated):
    """fp32 gated `_fused_gemm` at sm_80 is where the tutorial tiles overflowed most (6 of 7); the autotuner a
    launch gets on such a device holds only configs whose estimate fits, and never an empty set."""
    _sm80(monkeypatch)
    x = torch.empty(512, 4096, dtype=torch.float32, device="meta")
    w = torch.empty(2 * 4096 if gated else 4096, 4096, dtype=torch.float32, device="meta")
    with common.record_launches() as launches:
        fused_linear.fused_linear_triton(x, w, activation="silu", gated=gated)
    (launch,) = launches
    nargs = {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.constexprs}
    tuner = launch.tuned.autotuner(torch.device("cuda", 0), nargs)
    assert tuner.configs and all(launch.tuned.shared_bytes(c, nargs) <= 166_912 for c in tuner.configs)
    too_big = [c for c in launch.tuned.candidates(nargs, (8, 0)) if launch.tuned.shared_bytes(c, nargs) > 166_912]
    assert not any(c is t for c in tuner.configs for t in too_big)


def test_no_config_fits_is_one_clear_error():
    x = torch.empty(512, 4096, dtype=torch.float32, device="meta")
    w = torch.empty(4096, 4096, dtype=torch.float32, device="meta")
    with common.record_launches() as launches:
        fused_linear.fused_linear_triton(x, w)
    nargs = {**dict(zip(launches[0].kernel.arg_names, launches[0].args)), **launches[0].constexprs}
    with pytest.raises(ValueError, match=r"_fused_gemm_kernel: no config fits 1024 bytes of shared memory"):
        launches[0].tuned.configs_for((9, 0), 1024, nargs)
