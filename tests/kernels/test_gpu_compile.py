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
from llmcompress.testing.gpu_compile import check_row

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
def rows(reduced_gpu_rows) -> list[dict]:
    return reduced_gpu_rows("kernels")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family,kernel,variant", EXPECTED)
def test_kernel_compiles_for_the_gpu(rows, family, kernel, variant, dtype, target):
    found = [r for r in rows if (r["family"], r["kernel"], r["variant"], r["dtype"], r["target"])
             == (family, kernel, variant, dtype, target)]
    if family == "fp8_linear" and target == "sm_80":  # one row per shape, none compiled
        assert found and all("compute capability 8.0" in r["refused"] and "shared" not in r for r in found)
        return
    assert len(found) == 1, f"{len(found)} rows for {kernel} {variant} {dtype} {target}"
    check_row(found[0])


def test_every_kernel_is_compiled(rows):
    """A new @triton.jit kernel in these modules joins the set (its launcher must be called in gpu_compile.cases)."""
    defined = {(m.__name__.rsplit(".", 1)[1], name) for m in KERNEL_MODULES
               for name, obj in vars(m).items() if name.endswith("_kernel") and hasattr(obj, "fn")
               and inspect.getmodule(obj.fn) is m}
    compiled = {(r["family"], r["kernel"]) for r in rows}
    assert defined and defined <= compiled, f"not compiled: {sorted(defined - compiled)}"


def _fake_gpu(monkeypatch, capability=(8, 0), name="NVIDIA A100 (faked)"):
    """A CUDA device of `capability`, faked (no GPU here), with its shared memory per block from the table."""
    class Props:
        major, minor = capability
        shared_memory_per_block_optin = common.SHARED_MEMORY_LIMITS[capability]
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())


def test_fp8_launchers_refuse_sm_80(monkeypatch):
    _fake_gpu(monkeypatch)
    with FakeTensorMode():
        x = torch.empty(3, 256, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(64, 256, dtype=torch.float8_e4m3fn, device="cuda")
        s = torch.empty(64, dtype=torch.float32, device="cuda")
        match = r"NVIDIA A100 \(faked\) \(cuda:0\) has compute capability 8\.0; .* >= 8\.9"
        with pytest.raises(fp8_linear.FP8UnsupportedError, match=match):
            fp8_linear.linear_fp8_triton(x, w, s)
        with pytest.raises(fp8_linear.FP8UnsupportedError, match=match):
            fp8_linear.quantize_per_token_fp8_triton(x)


def _recorded_gemm(dtype, gated):
    x = torch.empty(512, 4096, dtype=dtype, device="meta")
    w = torch.empty(2 * 4096 if gated else 4096, 4096, dtype=dtype, device="meta")
    with common.record_launches() as launches:
        fused_linear.fused_linear_triton(x, w, activation="silu", gated=gated)
    (launch,) = launches
    return launch, {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.constexprs}


@pytest.mark.parametrize("gated", [False, True])
def test_configs_over_the_shared_limit_are_not_offered(monkeypatch, gated):
    """On an sm_86 GPU (101,376 B per block) the bf16 fused GEMM's larger tiles do not fit; the autotuner a launch
    gets holds only configs whose estimate fits, and is not empty."""
    _fake_gpu(monkeypatch, (8, 6), "NVIDIA A10 (faked)")
    launch, nargs = _recorded_gemm(torch.bfloat16, gated)
    tuner = launch.tuned.autotuner(torch.device("cuda", 0), nargs)
    limit = common.SHARED_MEMORY_LIMITS[(8, 6)]
    too_big = [c for c in launch.tuned.candidates(nargs, (8, 6)) if launch.tuned.shared_bytes(c, nargs) > limit]
    assert too_big and tuner.configs
    assert all(launch.tuned.shared_bytes(c, nargs) <= limit for c in tuner.configs)


def test_spilling_and_fp32_tiles_are_chosen_per_gpu():
    """bf16 gated `_fused_gemm`: 128x256 (~2.5 KB spilled) never offered, 128x64 at 4 warps not on sm_90 (40 B);
    fp32 gets the small FMA tiles."""
    launch, nargs = _recorded_gemm(torch.bfloat16, True)
    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in launch.tuned.configs_for((9, 0), 232_448, nargs)}
    assert (128, 256) not in tiles and (128, 64) not in tiles and (64, 128) in tiles
    launch, nargs = _recorded_gemm(torch.float32, False)
    offered = launch.tuned.configs_for((9, 0), 232_448, nargs)
    assert offered and all(any(c is f for f in common.GEMM_CONFIGS_FP32) for c in offered)


def test_no_config_fits_is_one_clear_error():
    x = torch.empty(512, 4096, dtype=torch.float32, device="meta")
    w = torch.empty(4096, 4096, dtype=torch.float32, device="meta")
    with common.record_launches() as launches:
        fused_linear.fused_linear_triton(x, w)
    nargs = {**dict(zip(launches[0].kernel.arg_names, launches[0].args)), **launches[0].constexprs}
    with pytest.raises(ValueError, match=r"_fused_gemm_kernel: no config fits 1024 bytes of shared memory"):
        launches[0].tuned.configs_for((9, 0), 1024, nargs)
