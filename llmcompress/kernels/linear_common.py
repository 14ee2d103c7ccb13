"""What the quantized-linear kernels (`int4_linear.py`, `int8_linear.py`, `w8a8_linear.py`, `fp8_linear.py`) share.

Each kernel file still holds its own kernels, launchers, reference and op; this module has only the pieces that are
the same logic in several of them:
- Triton helpers called from their kernels: `dot_fp32`, `grouped_pid`, `store_output`;
- launching: `INTERPRETED`, `autotuned` (configs offered per device: those whose shared memory fits,
  `Tuned`, `tile_shared_bytes`, `shared_memory_limit`), `launch`, `wrap`, `record_launches` (launches recorded
  instead of run, for compiling ahead of time), and the tutorial GEMM configs `GEMM_CONFIGS`;
- the weight-only linears' kernel by M: `DENSE_OFF`, `GEMV_MAX_M`, `gemv_bucket`, `gemv_on_tensor_cores`,
  `gemm_bucket`, `run_by_rows` (which M goes where is priced in `kernel_path.py`); their references' shared fp32
  math, `weight_only_linear_reference`;
- input checks: `check_activation`, `check_bias_act_scale`, `check_act_scale`, `check_dtype`, `check_devices`,
  `check_launchable`;
- the op plumbing: `linear_backward` (straight-through gradients), `weight_only_linear_cost`.

Kernels import the @triton.jit helpers by name (`from .linear_common import dot_fp32`), never as an attribute
(`common.dot_fp32`) or under an alias: Inductor copies the helpers a user kernel calls into its generated code by
looking up the kernel's global names and pasting each helper's source under its own name
(`user_defined_triton_kernel_transitive_closure_source_code` in torch/_inductor/codegen/wrapper.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from llmcompress.cost.roofline import io_bytes, numel, sym
from llmcompress.fx_utils import val

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DTYPES_TEXT = "float16, bfloat16 or float32"
# Default dense_min_m: larger than any M, so the dense path is off unless a pass asks for it.
DENSE_OFF = 2**62
# Rows one GEMV program holds (its largest BLOCK_M): gemv_max_m may not exceed it.
GEMV_MAX_M = 16


@triton.jit
def dot_fp32(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32; fp32 operands in full precision (the reference's numerics), not TF32."""
    # The Triton 3.9 interpreter multiplies bfloat16 operands as their raw uint16 storage; fp16/bf16 values
    # are exact in fp32, so upcasting there gives the tensor core's result (exact products, fp32 sums).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order (Triton matmul tutorial): GROUP_M row blocks in a row share
    their weight tiles while those are in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def store_output(acc, bias_ptr, out_ptr, rm, rn, m_mask, n_mask, stride_om, HAS_BIAS: tl.constexpr):
    """Epilogue of the weight-only kernels: out[rm, rn] = acc (+ bias[rn]) in fp32, rounded once to out's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Under TRITON_INTERPRET=1 @triton.jit returns an InterpretedFunction, which runs on CPU tensors; torch 2.11's
# wrap_triton rejects it (2.13 passes it through), and autotuning there would run every config in Python.
INTERPRETED = not isinstance(dot_fp32, JITFunction)

# The Triton matmul tutorial's fp16 tiles, the weight-only GEMMs' untuned guesses pending H100 measurement.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 128, 128, 8, 3),
        (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]
]


# Shared memory one block may opt in to, by compute capability (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"): a config above it cannot launch. Used where the device does not say
# (`shared_memory_limit`) and for compiling ahead of time (testing/gpu_compile.py).
SHARED_MEMORY_LIMITS = {(8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376, (9, 0): 232_448}


def shared_memory_limit(device) -> int:
    """Bytes of shared memory one block of a kernel may use on `device` (a CUDA device)."""
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    capability = (props.major, props.minor)
    if capability not in SHARED_MEMORY_LIMITS:
        raise ValueError(f"no shared-memory limit known for compute capability {capability}; known: "
                         f"{sorted(SHARED_MEMORY_LIMITS)}")
    return SHARED_MEMORY_LIMITS[capability]


class Tuned:
    """A kernel's autotuning configs, offered per device: `candidates(nargs, capability)` (all `configs` unless
    `choose` narrows them for the arguments and GPU: tiles that spill there are left out), less those whose
    shared memory exceeds the device's per-block limit; one `triton.autotune` per such set (the autotuner would
    skip a config that fails to launch, but a launcher must never offer it).

    shared_bytes(config, nargs) -> an upper bound of the config's shared memory in bytes, given the kernel's
    arguments and constexprs by name; checked against compiled kernels by the `gpu_compile` tests.
    """

    def __init__(self, kernel, configs, key, shared_bytes, choose=None) -> None:
        self.kernel = kernel
        self.configs = list(configs)
        self.key = key
        self.shared_bytes = shared_bytes
        self.choose = choose
        self._autotuners: dict[tuple, object] = {}

    def candidates(self, nargs: dict, capability: tuple) -> list:
        return list(self.choose(self.configs, nargs, capability)) if self.choose else list(self.configs)

    def configs_for(self, capability: tuple, limit: int, nargs: dict) -> list:
        """The configs offered on a GPU of `capability` where a block may use `limit` bytes of shared memory."""
        candidates = self.candidates(nargs, capability)
        fits = [c for c in candidates if self.shared_bytes(c, nargs) <= limit]
        if not fits:
            raise ValueError(f"{self.kernel.__name__}: no config fits {limit} bytes of shared memory per block "
                             f"(the smallest needs {min(self.shared_bytes(c, nargs) for c in candidates)})")
        return fits

    def autotuner(self, device, nargs: dict):
        props = torch.cuda.get_device_properties(device)
        fits = self.configs_for((props.major, props.minor), shared_memory_limit(device), nargs)
        ids = tuple(self.configs.index(c) for c in fits)
        if ids not in self._autotuners:
            self._autotuners[ids] = triton.autotune(fits, key=self.key)(self.kernel)
        return self._autotuners[ids]


# fp32 operands multiply with input_precision="ieee", which Triton runs as CUDA-core FMAs, not on tensor cores:
# the tutorial tiles above spill there (7-44 KB per thread, issue 12; 128x128x32 at 8 warps still 9.6-10 KB for the
# weight-only GEMMs), so fp32 gets small tiles: these spill nothing in the weight-only and plain fused GEMMs on
# sm_90 and sm_80 (M = 512, K = N = 4096, benchmarks/gpu_compile.py); the gated fused GEMM leaves out the few that
# spill there (fused_linear._GATED_SPILLS).
GEMM_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (16, 64, 32, 4, 3),
        (32, 32, 32, 4, 3),
        (32, 64, 16, 4, 3),
        (32, 64, 32, 4, 3),
        (32, 64, 32, 8, 3),
    ]
]


def gemm_choice(spills=None):
    """A `Tuned` choose for the weight-only and fused GEMMs: `GEMM_CONFIGS_FP32` when x (`x_ptr`) is float32,
    `GEMM_CONFIGS` otherwise, less the tiles that spill there (`spills`, see `spilling`)."""
    def choose(configs, nargs, capability):
        listed = GEMM_CONFIGS_FP32 if nargs["x_ptr"].dtype == torch.float32 else GEMM_CONFIGS
        return [c for c in configs
                if any(c is x for x in listed) and not (spills and spilling(spills, c, nargs, capability))]

    return choose


# fp32 GEMV tiles at the tensor-core bucket (16 rows, an fp32 `tl.dot` on FMAs), where the 16-bit ones spill
# (w4a16: all six, 112-4,468 B per thread; fused gated: 6 of 9, up to 4,768 B; sm_90, K = N = 4096): these spill
# nothing in any GEMV on sm_90 and sm_80 (benchmarks/gpu_compile.py).
GEMV_CONFIGS_FP32_DOT = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=3)
    for bn, bk in [(8, 64), (8, 128), (16, 32), (16, 64), (32, 32)]
]


def gemv_choice(fp32_tensor_core_configs=GEMV_CONFIGS_FP32_DOT, spills=None):
    """A `Tuned` choose for the GEMVs: for float32 x at the tensor-core row bucket (16 rows, where an fp32 `tl.dot`
    runs on FMAs and the 16-bit tiles spill), `fp32_tensor_core_configs`; otherwise the rest; less the tiles that
    spill there (`spills`, see `spilling`)."""
    def choose(configs, nargs, capability):
        fp32_dot = nargs["x_ptr"].dtype == torch.float32 and nargs["BLOCK_M"] >= GEMV_TENSOR_CORE_ROWS
        return [c for c in configs
                if any(c is x for x in fp32_tensor_core_configs) == fp32_dot
                and not (spills and spilling(spills, c, nargs, capability))]

    return choose


def spill_key(nargs, capability) -> tuple:
    """("sm_90" for Hopper and later, else "sm_80"; "fp32" or "16-bit" x): what `spills` tables are keyed by."""
    return ("sm_90" if tuple(capability) >= (9, 0) else "sm_80",
            "fp32" if nargs["x_ptr"].dtype == torch.float32 else "16-bit")


def spilling(spills: dict, config, nargs, capability) -> bool:
    """Whether the config's tile (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), BLOCK_M from the config or the launch (a
    GEMV's row bucket), is among those `spills[spill_key(...)]` lists: tiles measured to spill registers there
    (benchmarks/gpu_compile.py), which a launcher must not offer."""
    kw = {**nargs, **config.kwargs}
    tile = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps)
    return tile in spills.get(spill_key(nargs, capability), ())


def autotuned(kernel, configs, key, shared_bytes, choose=None) -> Tuned:
    """The kernel's configs, autotuned on `key` among those offered on the device (`Tuned`); under the
    interpreter `launch` runs `kernel` with one fixed config instead."""
    return Tuned(kernel, configs, key, shared_bytes, choose)


def _size(v, nargs) -> int:
    return v(nargs) if callable(v) else v


def element_size(name):
    """A callable of the named arguments: the element size of tensor argument `name`."""
    return lambda nargs: nargs[name].element_size()


def tile_shared_bytes(a_bytes, b_bytes, out_bytes, b_tiles=1, converted_bytes=0, b_k_fraction=1):
    """shared_bytes (see `Tuned`) of a K loop over a (BLOCK_M, BLOCK_K) x tile and `b_tiles` (BLOCK_K, BLOCK_N)
    weight tiles: num_stages buffers of each as loaded (a_bytes, b_bytes per element; the weight's BLOCK_K times
    `b_k_fraction`: 1/2 for packed int4), plus a weight tile converted in registers and staged once more for the
    dot (converted_bytes per element); or the epilogue's (BLOCK_M, BLOCK_N) output tile (out_bytes) when larger,
    as Triton reuses the pipeline's buffers for it (fp32 `_scaled_mm` at 128x256: 131,072 B, the output tile).
    Element sizes are numbers or callables of the named arguments; BLOCK_M comes from the config or the launch
    (the GEMVs' row bucket)."""
    def shared_bytes(config, nargs) -> int:
        kw = {**nargs, **config.kwargs}
        bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        stages = max(config.num_stages, 1)
        a = bm * bk * _size(a_bytes, nargs)
        b = int(bk * b_k_fraction) * bn * _size(b_bytes, nargs) * b_tiles
        pipeline = stages * (a + b) + bk * bn * _size(converted_bytes, nargs) * b_tiles
        return max(pipeline, bm * bn * _size(out_bytes, nargs))

    return shared_bytes


def launch(kernel, tuned, grid, args, interp_config, **constexprs) -> None:
    """Launch `kernel` autotuned over `tuned`'s configs that fit the device (through wrap_triton so Inductor
    sees it) or, under the interpreter, with `interp_config`; `grid(meta)` sees the config's block sizes either
    way. Inside `record_launches()` the launch is recorded instead."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, grid, tuple(args), dict(constexprs), tuned, None))
    elif INTERPRETED:
        meta = {**interp_config, **constexprs}
        kernel[grid(meta)](*args, **meta)
    else:
        nargs = {**dict(zip(kernel.arg_names, args)), **constexprs}
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        wrap_triton(tuned.autotuner(device, nargs))[grid](*args, **constexprs)


def wrap(kernel):
    """`kernel` ready to launch without autotuning: through wrap_triton, or as it is under the interpreter; inside
    `record_launches()`, a stand-in that records the launch."""
    if _recorded is not None:
        return _Recorder(kernel)
    return kernel if INTERPRETED else wrap_triton(kernel)


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it: the @triton.jit kernel, its grid (a tuple, or a callable of the
    config's meta-parameters), positional args, keyword constexprs and launch options, and the autotuning configs
    (`Tuned`) or, for a fixed launch, None."""

    kernel: object
    grid: object
    args: tuple
    constexprs: dict
    tuned: Tuned | None
    fixed: dict | None


class _Recorder:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            _recorded.append(Launch(self.kernel, grid, args, kwargs, None, kwargs))

        return record


_recorded: list | None = None


@contextlib.contextmanager
def record_launches():
    """Within it, the launchers record their kernel launches (into the yielded list) instead of running them:
    with meta tensors a launcher then checks its inputs and picks its kernels and configs as on a GPU, without
    one, and `testing/gpu_compile.py` compiles each recorded launch ahead of time."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


# The GEMVs multiply on tensor cores (tl.dot) from this many padded rows on (their `if BLOCK_M >= 16`), with fp32
# FMAs on CUDA cores below.
GEMV_TENSOR_CORE_ROWS = 16


def gemv_bucket(m) -> int:
    # The rows the GEMV pads M to: 1, 2, 4 (fp32 FMAs) or 16 (tensor cores). Comparisons rather than
    # next_power_of_2, so a symbolic M under torch.compile only gets range guards.
    if m <= 1:
        return 1
    if m <= 2:
        return 2
    if m <= 4:
        return 4
    return GEMV_TENSOR_CORE_ROWS


def gemv_on_tensor_cores(m) -> bool:
    """Whether the GEMV multiplies M rows on tensor cores (padded to 16) rather than with FMAs on CUDA cores."""
    return gemv_bucket(m) >= GEMV_TENSOR_CORE_ROWS


def gemm_bucket(m) -> int:
    # The GEMM autotuner's M key: powers of two from 32 to 8192, one tuning per bucket rather than per M.
    b = 32
    while b < 8192 and m > b:
        b *= 2
    return b


def run_by_rows(name, x, n, gemv_max_m, dense_min_m, gemv, gemm, dense, *args) -> torch.Tensor:
    """x (..., K) as M = x.numel() // K rows through the path M picks: `gemv` for M <= gemv_max_m (it wins ties
    with dense), `dense` for M >= dense_min_m, `gemm` in between, each called as path(x2d, *args) -> (M, n).

    Returns:
        (..., n), x.dtype.
    """
    if not 0 <= gemv_max_m <= GEMV_MAX_M:
        raise ValueError(f"{name}: gemv_max_m must be in [0, {GEMV_MAX_M}], got {gemv_max_m}")
    x2d = x.reshape(-1, x.shape[-1])
    m = x2d.shape[0]
    if m == 0 or n == 0:
        return x.new_empty((*x.shape[:-1], n))
    if m <= gemv_max_m:
        path = gemv
    elif m >= dense_min_m:
        path = dense
    else:
        path = gemm
    return path(x2d, *args).view(*x.shape[:-1], n)


def weight_only_linear_reference(x, w, bias, act_scale) -> torch.Tensor:
    """((x.float() * act_scale) @ w.T + bias.float()).to(x.dtype) for a dequantized float32 weight w (N, K):
    everything in fp32, rounded once to x.dtype (the weight-only references' numerics)."""
    h = x.float()
    if act_scale is not None:
        h = h * act_scale.float()
    y = h @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check_dtype(name, what, dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: {what} must be {SUPPORTED_DTYPES_TEXT}, got {dtype}")


def check_activation(name, x) -> None:
    """ValueError unless x is (..., K) in a supported float dtype (the weight-only linears' x)."""
    check_dtype(name, "x", x.dtype)
    if x.dim() == 0:
        raise ValueError(f"{name}: x must be (..., K), got a 0-d tensor")


def check_act_scale(name, act_scale, k) -> None:
    if act_scale is not None and (act_scale.dtype != torch.float32 or tuple(act_scale.shape) != (k,)):
        raise ValueError(f"{name}: act_scale must be float32 ({k},), got {act_scale.dtype} {tuple(act_scale.shape)}")


def check_bias_act_scale(name, x, n, bias, act_scale) -> None:
    """ValueError unless bias is None or (n,) in x's dtype, and act_scale None or (K,) float32."""
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n,)):
        raise ValueError(f"{name}: bias must be ({n},) in x's dtype {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    check_act_scale(name, act_scale, x.shape[-1])


def check_devices(name, *tensors) -> None:
    """ValueError unless every tensor that is not None is on one device."""
    tensors = [t for t in tensors if t is not None]
    if any(t.device != tensors[0].device for t in tensors):
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")


def check_launchable(name, x, reference="the reference") -> None:
    """ValueError if x is a CPU tensor and the kernels are compiled (not interpreted)."""
    if not INTERPRETED and x.device.type == "cpu":
        raise ValueError(
            f"{name}: x is on cpu; the Triton kernels need a GPU tensor (or TRITON_INTERPRET=1); "
            f"use {reference} on CPU"
        )


def linear_backward(ctx, grad_out, dequantize: Callable[[], torch.Tensor], in_scale: Optional[torch.Tensor],
                    bias_dtype: Optional[torch.dtype], bias_index: int):
    """(grad_x, grad_bias) of y = (x * in_scale) @ W.T + bias with W = dequantize() frozen, in plain torch.

    Straight-through for the ops that quantize x: its rounding counts as identity. For activations that require
    grad: without a formula torch.compile fails while tracing the joint graph of such a model (kernels/__init__.py).
    ctx holds x_dtype and needs_input_grad (x at 0, bias at `bias_index`); bias_dtype is None without a bias.
    """
    g = grad_out.float()
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = g @ dequantize()
        if in_scale is not None:
            grad_x = grad_x * in_scale
        grad_x = grad_x.to(ctx.x_dtype)
    if bias_dtype is not None and ctx.needs_input_grad[bias_index]:
        grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(bias_dtype)
    return grad_x, grad_bias


def node_arg(node, index: int, name: str):
    """A call's argument, positional or keyword (its fake value for a node); None when left to its default."""
    return val(node.args[index] if len(node.args) > index else node.kwargs.get(name))


def weight_only_linear_cost(node, bias_index: int, act_scale_index: int):
    """(flops, bytes) of a weight-only linear op: 2·M·N·K (+M·N bias, +M·K act_scale); bytes at the stored
    dtypes (`io_bytes`)."""
    x, qweight = node_arg(node, 0, "x"), node_arg(node, 1, "qweight")
    k, n = sym(x.shape[-1]), sym(qweight.shape[0])
    m = numel(x) / k
    flops = 2 * m * n * k
    if node_arg(node, bias_index, "bias") is not None:
        flops += m * n
    if node_arg(node, act_scale_index, "act_scale") is not None:
        flops += m * k
    return flops, io_bytes(node)
