"""Low-rank linears: y = (x @ V.T) @ U.T + bias, a weight W (N, K) stored as its factors U (N, r) and V (r, K).

Entry point: `torch.ops.llmcompress.linear_lowrank(x, v, u, bias=None, fused_max_m=16)`, factors in x's dtype.
On CUDA, M (the rows of x) <= fused_max_m runs `_lowrank_fused_kernel`, one launch; above, two cuBLAS GEMMs
(`F.linear` twice). On the CPU, the same two `F.linear` calls in x's dtype (torch's CPU matmul). Whether the split
pays against the dense weight at all is `lowrank_path.py`'s answer.

The fused kernel splits r, not N: program p owns BLOCK_R rows of V and the same columns of U. It computes
t = x @ V[p].T, (M, BLOCK_R), over the whole of K and keeps it in registers, then walks N adding t @ U[:, p].T into
an fp32 (M, N) accumulator with atomics. Every byte of V and U is read exactly once and t never goes to memory.
The alternative, one program per block of N outputs, has to recompute all of t = V x in every program: V, half
the factors' bytes, read N / BLOCK_N times (64 at N = 4096, BLOCK_N = 64); a two-phase grid (t to global memory,
a grid-wide barrier, then U) needs every program resident at once and deadlocks under the interpreter. The last
program to finish (an atomic ticket) rounds the accumulator once to x's dtype into y, so the op stays one kernel
launch after one zero fill of the accumulator and ticket. The price of splitting r: every program adds a whole
(M, N) partial, (r / BLOCK_R)·M·N fp32 atomics through L2 (16 MB at M = 16, r = 1024, BLOCK_R = 16, N = 4096, as many
bytes as the factors; 1 MB at M = 1). The cost model does not price L2 atomics; measure this first on a GPU.

Large M is compute-bound: 2·M·r·(K + N) FLOPs on tensor cores, where cuBLAS is at peak and a Triton `tl.dot` GEMM
would at best match it; the round trip of t moves 2·M·r elements against those FLOPs, K + N FLOPs per element (8192
at 4096x4096, far above an H100's ~300 FLOPs per byte), so one kernel would save little there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from llmcompress.cost.roofline import io_bytes, numel, register_cost, sym
from llmcompress.kernels import linear_common as common
from llmcompress.kernels.linear_common import GEMV_MAX_M, dot_fp32, gemv_bucket, node_arg

__all__ = ["FUSED_MAX_M", "linear_lowrank_reference", "linear_lowrank_triton"]

# The fused kernel holds at most this many rows (the GEMVs' tensor-core bucket); the op's default fused_max_m.
FUSED_MAX_M = GEMV_MAX_M


@triton.jit
def _lowrank_fused_kernel(
    x_ptr,
    v_ptr,
    u_ptr,
    bias_ptr,
    acc_ptr,
    ticket_ptr,
    out_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_vr,
    stride_un,
    stride_ur,
    stride_om,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per BLOCK_R of the rank, every row of x (M <= BLOCK_M <= 16). DIRECT: out is float32 and zeroed,
    # the atomics add into it and no epilogue runs.
    pid = tl.program_id(0)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = tl.arange(0, BLOCK_M)
    r_mask = rr < R
    m_mask = rm < M
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    v_rows = v_ptr + rr.to(tl.int64)[:, None] * stride_vr
    dt = x_ptr.dtype.element_ty
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        xk = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        vk = tl.load(v_rows + rk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if BLOCK_M >= 16:
            t = dot_fp32(xk, tl.trans(vk), t, UPCAST)
        else:
            t += tl.sum(xk.to(tl.float32)[:, None, :] * vk.to(tl.float32)[None, :, :], axis=2)
    # t as two terms in x's dtype for the tensor cores: hi + lo carries ~16 mantissa bits for bf16, so the result
    # is rounded about once (the reference's numerics), at twice the second dot's FLOPs (M <= 16: not the limit).
    t_hi = t.to(dt)
    t_lo = (t - t_hi.to(tl.float32)).to(dt)
    acc_base = acc_ptr + rm.to(tl.int64)[:, None] * N
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        un = tl.load(u_ptr + rn.to(tl.int64)[:, None] * stride_un + rr.to(tl.int64)[None, :] * stride_ur,
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
        if BLOCK_M >= 16:
            part = dot_fp32(t_hi, tl.trans(un), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST)
            if dt != tl.float32:  # fp32: t_hi is t, no lo term
                part = dot_fp32(t_lo, tl.trans(un), part, UPCAST)
        else:
            part = tl.sum(t[:, None, :] * un.to(tl.float32)[None, :, :], axis=2)
        if HAS_BIAS:
            # Program 0 adds the bias. pid as a (BLOCK_N,) vector: under the interpreter it is a Python int, and a
            # bare bool mask fails.
            first = (pid + tl.zeros((BLOCK_N,), dtype=tl.int32)) == 0
            b = tl.load(bias_ptr + rn, mask=n_mask & first, other=0.0).to(tl.float32)
            part += b[None, :]
        tl.atomic_add(acc_base + rn[None, :], part, mask=m_mask[:, None] & n_mask[None, :])
    if not DIRECT:
        # acq_rel: every program's adds are visible to the one that draws the last ticket.
        done = tl.atomic_add(ticket_ptr, 1)
        if done == tl.num_programs(0) - 1:
            for n0 in range(0, N, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                mask = m_mask[:, None] & (rn < N)[None, :]
                y = tl.load(acc_base + rn[None, :], mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], y.to(dt), mask=mask)


# Untuned guesses pending H100 measurement (no GPU was lent when this was written). BLOCK_R 16 at r = 1024 gives
# 64 programs; 8 gives 128, nearer the H100's 132 SMs, on the FMA path only (tl.dot needs 16).
_FUSED_CONFIGS = [
    triton.Config({"BLOCK_R": br, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for br, bk, bn, w, st in [(8, 128, 64, 4, 3), (8, 256, 64, 4, 2), (16, 128, 64, 4, 3), (16, 256, 128, 4, 2),
                              (16, 64, 128, 4, 3), (32, 128, 64, 8, 2)]
]
_FUSED_INTERP = {"BLOCK_R": 16, "BLOCK_K": 32, "BLOCK_N": 32, "num_warps": 4}


def _fused_shared_bytes(config, nargs) -> int:
    """Upper bound of shared memory: num_stages buffers of the x and V tiles of the K loop, or of the U tile and
    the fp32 partial of the N loop, whichever is larger."""
    kw = {**nargs, **config.kwargs}
    bm, br, bk, bn = kw["BLOCK_M"], kw["BLOCK_R"], kw["BLOCK_K"], kw["BLOCK_N"]
    e = nargs["x_ptr"].element_size()
    stages = max(config.num_stages, 1)
    return max(stages * (bm + br) * bk * e, stages * bn * br * e + bm * bn * 4)


# Tiles (row bucket BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N, num_warps) that spill registers, per
# `linear_common.spill_key`, over the full set (M = 1, 3, 16 at K = N = 4096, r = 1024, U as (N, r) rows and as a
# transpose view; benchmarks/gpu_compile.py --families lowrank): left out there, for both layouts of U.
_FUSED_SPILLS = {("sm_90", "fp32"): {(4, 16, 128, 64, 4)},  # 16 B per thread, U rows
                 ("sm_90", "16-bit"): {(16, 16, 64, 128, 4)}}  # 8 B, U transposed


def _fused_choice(configs, nargs, capability):
    # tl.dot (BLOCK_M = 16) needs BLOCK_R >= 16; the fp32 FMA tiles (BLOCK_M <= 4) take any.
    spills = _FUSED_SPILLS.get(common.spill_key(nargs, capability), ())
    return [c for c in configs if (nargs["BLOCK_M"] < 16 or c.kwargs["BLOCK_R"] >= 16)
            and (nargs["BLOCK_M"], *(c.kwargs[b] for b in ("BLOCK_R", "BLOCK_K", "BLOCK_N")), c.num_warps)
            not in spills]


_fused_tuned = common.autotuned(_lowrank_fused_kernel, _FUSED_CONFIGS, key=["BLOCK_M", "N", "K", "R"],
                                shared_bytes=_fused_shared_bytes, choose=_fused_choice)


def linear_lowrank_reference(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None,
                             fused_max_m: int = FUSED_MAX_M) -> torch.Tensor:
    """The op's numerics in plain torch, the kernels' oracle: ((x.float() @ V.T) @ U.T + bias.float()), float32
    throughout, rounded once to x.dtype.

    Args:
        x: (..., K) float16/bfloat16/float32.
        v: (r, K), u: (N, r), both in x's dtype, 1 <= r; u may be the transpose view of a (r, N) tensor (the
            fused kernel then reads it along N, coalesced).
        bias: optional (N,), x.dtype.
        fused_max_m: kernel choice of the CUDA path; ignored here.

    Returns:
        (..., N) in x.dtype.
    """
    y = (x.float() @ v.float().T) @ u.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _check_inputs(x, v, u, bias, fused_max_m, name="linear_lowrank") -> None:
    common.check_activation(name, x)
    k = x.shape[-1]
    if v.dim() != 2 or v.dtype != x.dtype or v.shape[1] != k or v.shape[0] < 1:
        raise ValueError(f"{name}: v must be (r, K) = (r, {k}) with r >= 1 in x's dtype {x.dtype}, "
                         f"got {v.dtype} {tuple(v.shape)}")
    r = v.shape[0]
    if u.dim() != 2 or u.dtype != x.dtype or u.shape[1] != r:
        raise ValueError(f"{name}: u must be (N, r) = (N, {r}) in x's dtype {x.dtype}, got {u.dtype} {tuple(u.shape)}")
    common.check_bias_act_scale(name, x, u.shape[0], bias, None)
    common.check_devices(name, x, v, u, bias)
    if not 0 <= fused_max_m <= FUSED_MAX_M:
        raise ValueError(f"{name}: fused_max_m must be in [0, {FUSED_MAX_M}], got {fused_max_m}")


def _launch_fused(x2d, v, u, bias) -> torch.Tensor:
    m = x2d.shape[0]
    if m > FUSED_MAX_M:
        raise ValueError(f"low-rank fused kernel: M must be <= {FUSED_MAX_M}, got {m}")
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    v = v if v.stride(1) == 1 else v.contiguous()
    # U as given when either of its strides is 1: (N, r) rows, or the transpose view of a (r, N) tensor, whose
    # loads along N are contiguous (a (BLOCK_N, BLOCK_R) tile of (N, r) rows reads BLOCK_R elements per row).
    u = u if 1 in u.stride() else u.contiguous()
    n, k, r = u.shape[0], x2d.shape[1], v.shape[0]
    direct = x2d.dtype == torch.float32
    # The fp32 accumulator and the ticket zeroed by one fill (int32 0 is float 0.0): with the kernel, two launches.
    zeroed = torch.zeros((m * n + 1,), dtype=torch.int32, device=x2d.device)
    acc, ticket = zeroed[: m * n].view(torch.float32).view(m, n), zeroed[m * n:]
    out = acc if direct else torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    common.launch(
        _lowrank_fused_kernel,
        _fused_tuned,
        lambda meta_: (triton.cdiv(r, meta_["BLOCK_R"]),),
        (x2d, v, u, x2d if bias is None else bias, acc, ticket, out, m, n, k, r,
         x2d.stride(0), v.stride(0), u.stride(0), u.stride(1), out.stride(0)),
        _FUSED_INTERP,
        HAS_BIAS=bias is not None,
        DIRECT=direct,
        UPCAST=common.INTERPRETED,
        BLOCK_M=gemv_bucket(m),
    )
    return out


def _two_linears(x2d, v, u, bias) -> torch.Tensor:
    """Two GEMMs in x's dtype (cuBLAS, or torch's CPU matmul): t = x @ V.T is rounded to x's dtype once between."""
    return F.linear(F.linear(x2d, v), u, bias)


def linear_lowrank_triton(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None,
                          fused_max_m: int = FUSED_MAX_M) -> torch.Tensor:
    """y = (x @ V.T) @ U.T + bias: the fused kernel for M <= fused_max_m (at most 16), two GEMMs above.

    Args: as `linear_lowrank_reference`, all on one Triton device (CPU only under TRITON_INTERPRET=1).

    Returns:
        (..., N) contiguous, x.dtype.
    """
    _check_inputs(x, v, u, bias, fused_max_m)
    common.check_launchable("linear_lowrank_triton", x, "linear_lowrank_reference")
    x2d = x.reshape(-1, x.shape[-1])
    m, n = x2d.shape[0], u.shape[0]
    if m == 0 or n == 0:
        return x.new_empty((*x.shape[:-1], n))
    path = _launch_fused if m <= fused_max_m else _two_linears
    return path(x2d, v, u, bias).view(*x.shape[:-1], n)


# triton_op infers the schema from the annotations; its body is also the fake impl and is inlined under
# torch.compile without the CPU kernel, so it calls that kernel's function itself off CUDA (see rms_norm.py).
@triton_op("llmcompress::linear_lowrank", mutates_args=())
def _linear_lowrank_op(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None,
                       fused_max_m: int = FUSED_MAX_M) -> torch.Tensor:
    if x.device.type != "cuda":  # the CPU, and the meta device of a cost report's trace
        return _linear_lowrank_cpu(x, v, u, bias, fused_max_m)
    return linear_lowrank_triton(x, v, u, bias, fused_max_m)


@_linear_lowrank_op.register_kernel("cpu")
def _linear_lowrank_cpu(x, v, u, bias=None, fused_max_m=FUSED_MAX_M):
    """Two F.linear calls in x's dtype: torch's CPU matmul is the fast path there (the reference's float32 copies
    of the factors would cost more than the product)."""
    _check_inputs(x, v, u, bias, fused_max_m)
    return _two_linears(x.reshape(-1, x.shape[-1]), v, u, bias).view(*x.shape[:-1], u.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, v, u, bias = inputs[:4]
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(v, u)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out: torch.Tensor):
    """Gradients for x and bias with the factors frozen (`linear_common.linear_backward` on W = U V in fp32)."""
    v, u = ctx.saved_tensors
    grad_x, grad_bias = common.linear_backward(ctx, grad_out, lambda: u.float() @ v.float(), None, ctx.bias_dtype, 3)
    return grad_x, None, None, grad_bias, None


_linear_lowrank_op.register_autograd(_backward, setup_context=_setup_context)


@register_cost(torch.ops.llmcompress.linear_lowrank.default)
def _linear_lowrank_cost(node):
    """(flops, bytes): 2·M·r·(K + N) (+M·N bias); bytes of x, v, u, bias and y at their dtypes (`io_bytes`), as
    the fused kernel never writes t. The two-GEMM path's round trip of t is priced in `lowrank_path.py`."""
    x, v, u = node_arg(node, 0, "x"), node_arg(node, 1, "v"), node_arg(node, 2, "u")
    k, r, n = sym(x.shape[-1]), sym(v.shape[0]), sym(u.shape[0])
    m = numel(x) / k
    flops = 2 * m * r * (k + n)
    if node_arg(node, 3, "bias") is not None:
        flops += m * n
    return flops, io_bytes(node)
