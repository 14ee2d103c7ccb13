"""Every Triton kernel compiled ahead of time for real GPUs (sm_90, sm_80), on a machine without one.

The Triton interpreter accepts code a GPU compile rejects (a loop-carried value changing dtype, tiles over the
shared-memory limit), and spills are invisible to it. Here each launcher runs on meta tensors inside
`kernels.linear_common.record_launches()`, so it checks its inputs and picks its kernels as on a GPU; each recorded
launch, with every config the launcher offers for the target (`Tuned.configs_for`: those whose shared memory fits),
goes through `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90 | 80, 32))` to cubin with Triton's own
ptxas, which reports registers and spills; `metadata.shared` gives shared memory.

Entry points: `launches(full)` (what to compile), `compile_rows(launches, targets, jobs)` (one row per kernel,
config, dtype, shape and target), `reduced(rows)`; `python -m llmcompress.testing.gpu_compile` writes the rows as
JSON (`benchmarks/gpu_compile.py` runs the full set; the `gpu_compile` tests the reduced one). Needs compiled
Triton: run it without TRITON_INTERPRET=1 (tests start it in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F
import triton
from torch.fx.experimental.proxy_tensor import make_fx

from llmcompress.codegen import compile_group
from llmcompress.cost.device_profile import device_name
from llmcompress.formats.sparse import meta_columns
from llmcompress.kernels import (
    fp8_linear,
    fused_linear,
    int4_linear,
    int8_linear,
    lowrank_linear,
    moe_experts,
    moe_load_counters,
    moe_route,
    moe_skip_compensation,
    rms_norm,
    sparse_linear,
    w8a8_linear,
)
from llmcompress.kernels import linear_common as common

aten = torch.ops.aten

# name -> (compute capability as Triton's target wants it, shared memory per block)
TARGETS = {"sm_90": (90, common.SHARED_MEMORY_LIMITS[(9, 0)]), "sm_80": (80, common.SHARED_MEMORY_LIMITS[(8, 0)])}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Decode (M = 1, 3, 16: GEMV buckets 1, 4, 16), short and long prefill (64, 512) at K = N = 4096, and one
# awkward shape (N not a multiple of 16, so Triton drops its divisibility hints) at a GEMV and a GEMM row count.
FULL_SHAPES = [(m, 4096, 4096) for m in (1, 3, 16, 64, 512)] + [(3, 5504, 1000), (77, 5504, 1000)]
# The tests' set: one GEMV (FMA bucket) and one GEMM row count.
REDUCED_SHAPES = [(3, 4096, 4096), (512, 4096, 4096)]


@dataclasses.dataclass
class Case:
    """A launcher call on meta tensors: family (kernel file or "codegen"), variant, dtype, (M, K, N)."""

    family: str
    variant: str
    dtype: str
    shape: tuple
    call: Callable[[], None]


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _linear_cases(dtype: str, m: int, k: int, n: int) -> list[Case]:
    dt = DTYPES[dtype]
    x = _meta(m, k, dtype=dt)
    q8, scale = _meta(n, k, dtype=torch.int8), _meta(n, dtype=torch.float32)
    q4, sz = _meta(n, k // 2, dtype=torch.uint8), _meta(n, k // 128, dtype=torch.float16)
    fp8 = _meta(n, k, dtype=torch.float8_e4m3fn)
    w, w2, res = _meta(n, k, dtype=dt), _meta(2 * n, k, dtype=dt), _meta(m, n, dtype=dt)
    shape = (m, k, n)
    return [
        Case("int8_linear", "", dtype, shape, lambda: int8_linear.linear_w8a16_triton(x, q8, scale)),
        Case("int4_linear", "group 128", dtype, shape,
             lambda: int4_linear.linear_w4a16_triton(x, q4, sz, sz, 128)),
        Case("fused_linear", "plain", dtype, shape, lambda: fused_linear.fused_linear_triton(x, w)),
        # The heaviest epilogue: two weight tiles (gate, up), RMS prologue, residual.
        Case("fused_linear", "gated silu, rms, residual", dtype, shape,
             lambda: fused_linear.fused_linear_triton(x, w2, residual=res, activation="silu", gated=True,
                                                      rms_eps=1e-6)),
        Case("w8a8_linear", "", dtype, shape, lambda: w8a8_linear.linear_w8a8_triton(x, q8, scale)),
        Case("fp8_linear", "", dtype, shape, lambda: fp8_linear.linear_fp8_triton(x, fp8, scale)),
    ]


def _sparse_cases(dtype: str, m: int, k: int, n: int) -> list[Case]:
    """The 2:4 linears (`kernels/sparse_linear.py`): values in x's dtype, and int4 codes at group 128."""
    dt = DTYPES[dtype]
    x, meta = _meta(m, k, dtype=dt), _meta(n, meta_columns(k), dtype=torch.uint8)
    values, q = _meta(n, k // 2, dtype=dt), _meta(n, k // 4, dtype=torch.uint8)
    sz = _meta(n, k // 128, dtype=torch.float16)
    shape = (m, k, n)
    return [
        Case("sparse_linear", "2:4", dtype, shape, lambda: sparse_linear.linear_2of4_triton(x, values, meta)),
        Case("sparse_linear", "int4 + 2:4 group 128", dtype, shape,
             lambda: sparse_linear.linear_2of4_w4a16_triton(x, q, meta, sz, sz, 128)),
    ]


# The low-rank linear's fused kernel (`kernels/lowrank_linear.py`) at r = 1024, the benchmark's rank, K = N = 4096:
# its FMA rows (M = 1, 3: buckets 1, 4) and its tensor-core rows (M = 16); above 16 rows the op runs cuBLAS.
LOWRANK_RANK = 1024
LOWRANK_ROWS = {"full": (1, 3, 16), "reduced": (3, 16)}


def _lowrank_cases(dtype: str, m: int, k: int, n: int) -> list[Case]:
    dt = DTYPES[dtype]
    x, v, u = _meta(m, k, dtype=dt), _meta(LOWRANK_RANK, k, dtype=dt), _meta(n, LOWRANK_RANK, dtype=dt)
    u_t = _meta(LOWRANK_RANK, n, dtype=dt).T  # U stored (r, N): the kernel reads it along N
    variant = f"r {LOWRANK_RANK}, " + ("tensor-core rows" if m >= common.GEMV_TENSOR_CORE_ROWS else "fma rows")
    return [Case("lowrank_linear", variant, dtype, (m, k, n), lambda: lowrank_linear.linear_lowrank_triton(x, v, u)),
            Case("lowrank_linear", f"{variant}, u transposed", dtype, (m, k, n),
                 lambda: lowrank_linear.linear_lowrank_triton(x, v, u_t))]


# MoE blocks (`kernels/moe_route.py`, `moe_experts.py`): (name, H, I, E, k) and the token counts compiled, each with
# the path and block_m `moe_path.choose_moe_path` takes on an H100 (bf16): the GEMV at T = 1, the GEMM at 16 and 512
# (Mixtral-8x7B: block_m 64; OLMoE: 128); block_m 16 at 16 tokens as well, the smallest blocks.
MOE_BLOCKS = {"mixtral-8x7b": (4096, 14336, 8, 2), "olmoe": (2048, 1024, 64, 8)}
MOE_RUNS = {"full": ((1, "gemv", 16), (16, "gemm", 16), (16, "gemm", 64), (512, "gemm", 64), (512, "gemm", 128)),
            "reduced": ((1, "gemv", 16), (512, "gemm", 64))}


def _moe_cases(dtype: str, full: bool) -> list[Case]:
    dt = DTYPES[dtype]
    out = []
    for name, (h, i, e, k) in MOE_BLOCKS.items():
        w_gate_up, w_down = _meta(e, 2 * i, h, dtype=dt), _meta(e, h, i, dtype=dt)
        for t, path, block_m in MOE_RUNS["full" if full else "reduced"]:
            x, logits = _meta(t, h, dtype=dt), _meta(t, e, dtype=dt)

            def call(x=x, logits=logits, t=t, path=path, block_m=block_m, k=k, w_gate_up=w_gate_up, w_down=w_down):
                routing = moe_route.moe_route_triton(logits, k, "softmax", True, block_m)
                moe_experts.moe_experts_triton(x, w_gate_up, w_down, *routing, block_m, t if path == "gemv" else 0)

            variant = f"{name} ({e} experts, top-{k}), {path}, block_m {block_m}"
            out.append(Case("moe", variant, dtype, (t, h, i), call))
    return out


def _moe_int4_cases(dtype: str, full: bool) -> list[Case]:
    """int4 experts (group 128) on the Mixtral-8x7B block: the same kernels with QUANT = 1 (x float16 / bfloat16),
    without and with AWQ's per-expert scales."""
    dt = DTYPES[dtype]
    out = []
    if dt == torch.float32:
        return out
    h, i, e, k = MOE_BLOCKS["mixtral-8x7b"]
    q_gu, s_gu = _meta(e, 2 * i, h // 2, dtype=torch.uint8), _meta(e, 2 * i, h // 128, dtype=torch.float16)
    q_d, s_d = _meta(e, h, i // 2, dtype=torch.uint8), _meta(e, h, i // 128, dtype=torch.float16)
    a_gu, a_d = _meta(e, h, dtype=torch.float32), _meta(e, i, dtype=torch.float32)
    for t, path, block_m in MOE_RUNS["full" if full else "reduced"]:
        x, logits = _meta(t, h, dtype=dt), _meta(t, e, dtype=dt)

        def call_w4(x=x, logits=logits, t=t, path=path, block_m=block_m):
            routing = moe_route.moe_route_triton(logits, k, "softmax", True, block_m)
            moe_experts.moe_experts_w4a16_triton(x, q_gu, s_gu, s_gu, q_d, s_d, s_d, 128, *routing, block_m,
                                                 t if path == "gemv" else 0)

        variant = f"mixtral-8x7b int4 g128, {path}, block_m {block_m}"
        out.append(Case("moe", variant, dtype, (t, h, i), call_w4))

        def call_awq(x=x, logits=logits, t=t, path=path, block_m=block_m):
            # AWQ experts: the same kernels with HAS_ACT, the x / h tile times the expert's float32 1/s.
            routing = moe_route.moe_route_triton(logits, k, "softmax", True, block_m)
            moe_experts.moe_experts_w4a16_triton(x, q_gu, s_gu, s_gu, q_d, s_d, s_d, 128, *routing, block_m,
                                                 t if path == "gemv" else 0, a_gu, a_d)

        out.append(Case("moe", f"mixtral-8x7b int4 g128 awq, {path}, block_m {block_m}", dtype, (t, h, i),
                        call_awq))
    return out


def _moe_int8_cases(dtype: str, full: bool) -> list[Case]:
    """int8 experts (one scale per row) on the Mixtral-8x7B block: the same kernels with QUANT = 2 (x float16 /
    bfloat16), and the load counters' and the skip compensation's kernels (`moe_load_counters.py`,
    `moe_skip_compensation.py`) on its routing, and the routing with skipping (`moe_route`'s `skip_beta`)."""
    dt = DTYPES[dtype]
    out = []
    if dt == torch.float32:
        return out
    h, i, e, k = MOE_BLOCKS["mixtral-8x7b"]
    q_gu, s_gu = _meta(e, 2 * i, h, dtype=torch.int8), _meta(e, 2 * i, dtype=torch.float32)
    q_d, s_d = _meta(e, h, i, dtype=torch.int8), _meta(e, h, dtype=torch.float32)
    for t, path, block_m in MOE_RUNS["full" if full else "reduced"]:
        x, logits = _meta(t, h, dtype=dt), _meta(t, e, dtype=dt)

        def call_w8(x=x, logits=logits, t=t, path=path, block_m=block_m):
            routing = moe_route.moe_route_triton(logits, k, "softmax", True, block_m)
            moe_experts.moe_experts_w8a16_triton(x, q_gu, s_gu, q_d, s_d, *routing, block_m,
                                                 t if path == "gemv" else 0)

        out.append(Case("moe", f"mixtral-8x7b int8, {path}, block_m {block_m}", dtype, (t, h, i), call_w8))
    t = 512
    ids, weights = _meta(t, k, dtype=torch.int32), _meta(t, k, dtype=torch.float32)
    tokens, weight_sum = _meta(e, dtype=torch.int64), _meta(e, dtype=torch.float32)
    out.append(Case("moe", f"load counters, {t} tokens top-{k}", dtype, (t, h, i),
                    lambda: moe_load_counters.moe_count_load_triton(weights, ids, tokens, weight_sum)))
    y, means = _meta(t, h, dtype=dt), _meta(e, h, dtype=torch.float32)
    out.append(Case("moe", f"skip compensation, {t} tokens top-{k}", dtype, (t, h, i),
                    lambda: moe_skip_compensation.moe_skip_compensate_triton(y, weights, ids, means, 0.3)))
    logits = _meta(t, e, dtype=dt)  # fuse-moe's skip_beta: the top-k kernel's SKIP branch
    out.append(Case("moe", f"routing with skipping, {t} tokens top-{k}", dtype, (t, h, i),
                    lambda: moe_route.moe_route_triton(logits, k, "softmax", True, 16, 0.3)))
    return out


def _weight_cases(dtype: str, k: int, n: int) -> list[Case]:
    """Kernels that do not depend on M: dequantization (the dense path) and RMSNorm over rows of n."""
    dt = DTYPES[dtype]
    q8, scale = _meta(n, k, dtype=torch.int8), _meta(n, dtype=torch.float32)
    q4, sz = _meta(n, k // 2, dtype=torch.uint8), _meta(n, k // 128, dtype=torch.float16)
    x, g = _meta(64, n, dtype=dt), _meta(n, dtype=dt)
    shape = (None, k, n)
    return [
        Case("int8_linear", "dequantize", dtype, shape, lambda: int8_linear.dequantize_w8_triton(q8, scale, dt)),
        Case("int4_linear", "dequantize", dtype, shape,
             lambda: int4_linear.dequantize_w4_triton(q4, sz, sz, 128, dt)),
        Case("rms_norm", "", dtype, (64, None, n), lambda: rms_norm.rms_norm_triton(x, g, 1e-6)),
    ]


# Groups of the fusion tests (tests/codegen/test_emit.py, tests/passes/fusion/): what fuse-pointwise makes of a
# Llama layer's norms, rotary embedding, gated MLP activation and attention softmax, and a LayerNorm.
def _llama_rms_norm(x, w):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (w * h.to(x.dtype),)


def _residual_rms_norm(h, r, w):
    s = r + h
    return s, *_llama_rms_norm(s, w)


def _silu_mul(g, u):
    return (F.silu(g) * u,)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotary(q, cos, sin):
    return (q * cos + _rotate_half(q) * sin,)


def _softmax_mask(s, mask):
    return (torch.softmax((s + mask).float(), dim=-1).to(s.dtype),)


def _layer_norm(x, w, b):
    return (F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),)


def _group_inputs(name: str, dt, m: int, n: int) -> tuple[Callable, list]:
    """The group function and its meta inputs at M rows of n (heads of 128 for rotary, n keys for softmax)."""
    if name == "rms_norm":
        return _llama_rms_norm, [_meta(m, n, dtype=dt), _meta(n, dtype=dt)]
    if name == "residual_rms_norm":
        return _residual_rms_norm, [_meta(m, n, dtype=dt), _meta(m, n, dtype=dt), _meta(n, dtype=dt)]
    if name == "silu_mul":
        return _silu_mul, [_meta(m, n, dtype=dt), _meta(m, n, dtype=dt)]
    if name == "rotary":
        return _rotary, [_meta(1, 32, m, 128, dtype=dt), _meta(1, 1, m, 128, dtype=dt), _meta(1, 1, m, 128, dtype=dt)]
    if name == "softmax_mask":
        return _softmax_mask, [_meta(1, 32, m, n, dtype=dt), _meta(1, 1, m, n, dtype=dt)]
    if name == "layer_norm":
        return _layer_norm, [_meta(m, n, dtype=dt), _meta(n, dtype=dt), _meta(n, dtype=dt)]
    raise ValueError(f"unknown group {name!r}")


GROUPS = ("rms_norm", "residual_rms_norm", "silu_mul", "rotary", "softmax_mask", "layer_norm")
REDUCED_GROUPS = ("residual_rms_norm", "rotary", "softmax_mask")


def _codegen_case(name: str, dtype: str, m: int, n: int) -> Case:
    fn, inputs = _group_inputs(name, DTYPES[dtype], m, n)

    def call():
        fake = [torch.empty_like(t, device="cpu") for t in inputs]
        gm = make_fx(fn, tracing_mode="fake")(*fake)
        nodes = [x for x in gm.graph.nodes if x.op == "call_function" and x.target is not aten.sym_size.int]
        kernel = compile_group(nodes, name_hint=name)
        by_placeholder = dict(zip(gm.graph.find_nodes(op="placeholder"), inputs))
        fn_, grid, args, meta = kernel.launch_args([by_placeholder[x] for x in kernel.inputs])
        common.wrap(fn_)[grid](*args, **meta)

    return Case("codegen", name, dtype, (m, None, n), call)


FAMILIES = ("kernels", "sparse", "lowrank", "moe", "moe-int4", "moe-int8", "codegen")


def cases(full: bool, families: tuple[str, ...] = FAMILIES, dtypes=tuple(DTYPES)) -> list[Case]:
    out = []
    shapes = FULL_SHAPES if full else REDUCED_SHAPES
    for dtype in dtypes:
        if "kernels" in families:
            for m, k, n in shapes:
                out += _linear_cases(dtype, m, k, n)
            for k, n in sorted({(k, n) for _, k, n in shapes}):
                out += _weight_cases(dtype, k, n)
        if "sparse" in families:
            for m, k, n in shapes:
                out += _sparse_cases(dtype, m, k, n)
        if "lowrank" in families:
            for m in LOWRANK_ROWS["full" if full else "reduced"]:
                out += _lowrank_cases(dtype, m, 4096, 4096)
        if "moe" in families:
            out += _moe_cases(dtype, full)
        if "moe-int4" in families:
            out += _moe_int4_cases(dtype, full)
        if "moe-int8" in families:
            out += _moe_int8_cases(dtype, full)
        if "codegen" in families:
            for name in GROUPS if full else REDUCED_GROUPS:
                for m, n in ((1, 4096), (512, 4096), (3, 1000)) if full else ((512, 4096),):
                    out.append(_codegen_case(name, dtype, m, n))
    return out


@dataclasses.dataclass
class Job:
    """One compile: a recorded launch with one config (None: a fixed launch), for one target."""

    case: Case
    launch: common.Launch
    config: triton.Config | None
    target: str
    offered: bool
    shared_estimate: int | None


def _nargs(launch: common.Launch) -> dict:
    return {**dict(zip(launch.kernel.arg_names, launch.args)), **launch.constexprs}


def _fp8_refusal(target: str) -> str | None:
    """The fp8 launcher's error on a GPU of `target`'s capability (faked: no GPU here), or None if it runs."""
    cap = TARGETS[target][0]
    with mock.patch.object(torch.version, "hip", None), \
            mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: divmod(cap, 10)), \
            mock.patch.object(torch.cuda, "get_device_name", lambda device=None: f"a GPU of {target}"):
        try:
            fp8_linear.check_fp8_device("cuda:0", "linear_fp8_triton")
        except fp8_linear.FP8UnsupportedError as e:
            return str(e)
    return None


def jobs(all_cases: list[Case], targets: list[str], pruned: bool = True) -> tuple[list[Job], list[dict]]:
    """The compiles the cases' launches need per target, and rows for what is not compiled: configs pruned for
    the target's shared memory (`pruned`), and launches the launcher refuses there (fp8 below sm_89)."""
    out, rows = [], []
    for case in all_cases:
        with common.record_launches() as launches:
            case.call()
        for target in targets:
            refusal = _fp8_refusal(target) if case.family == "fp8_linear" else None
            for launch in launches:
                if refusal:
                    rows.append({**_row_head(case, launch, None, target), "ok": True, "refused": refusal})
                    continue
                if launch.tuned is None:
                    out.append(Job(case, launch, None, target, True, None))
                    continue
                nargs = _nargs(launch)
                capability = divmod(TARGETS[target][0], 10)
                offered = launch.tuned.configs_for(capability, TARGETS[target][1], nargs)
                for config in launch.tuned.candidates(nargs, capability):
                    estimate = launch.tuned.shared_bytes(config, nargs)
                    if any(config is c for c in offered):
                        out.append(Job(case, launch, config, target, True, estimate))
                    elif pruned:
                        rows.append({**_row_head(case, launch, config, target), "offered": False,
                                     "shared_estimate": estimate, "ok": True})
    return out, rows


def _config_dict(config: triton.Config | None, launch: common.Launch) -> dict:
    if config is None:
        return {k: v for k, v in launch.constexprs.items() if k.startswith(("BLOCK", "num_"))}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _row_head(case: Case, launch: common.Launch, config, target: str) -> dict:
    m, k, n = case.shape
    return {"family": case.family, "kernel": launch.kernel.__name__, "variant": case.variant, "dtype": case.dtype,
            "M": m, "K": k, "N": n, "target": target, "config": _config_dict(config, launch),
            "shared_limit": TARGETS[target][1]}


_PTXAS = {"regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads"}


def _specialize(job: Job) -> tuple:
    """(kernel, target, source, signature, constexprs, attrs, options): what `triton.compile` takes for this job,
    found as the kernel's own launch would (its argument binder: dtypes, divisibility by 16, constexprs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    launch, kernel = job.launch, job.launch.kernel
    kwargs = {**launch.constexprs, **(job.config.all_kwargs() if job.config else {})}
    target = GPUTarget("cuda", TARGETS[job.target][0], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, ASTSource(kernel, signature, constexprs, attrs), options


def _key(job: Job) -> str:
    """What identifies the compile; a launch Triton's binder refuses (bad options) keys its error instead."""
    try:
        _, src, options = _specialize(job)
    except Exception as e:  # noqa: BLE001 - becomes a failing row
        return f"error: {type(e).__name__}: {str(e)[:2000]}"
    return repr((src.hash(), job.target, sorted(options.__dict__.items())))


def _compile(job: Job) -> dict:
    """Compile one job to cubin; registers and spills from ptxas's log, shared memory from the metadata."""
    log = io.StringIO()
    start = time.perf_counter()
    try:
        target, src, options = _specialize(job)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compile error becomes a failing row with its message
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}",
                "compile_s": round(time.perf_counter() - start, 2)}
    found = {k: re.search(p, log.getvalue()) for k, p in _PTXAS.items()}
    row = {k: int(v.group(1)) if v else 0 for k, v in found.items()}
    row.update(shared=int(compiled.metadata.shared), compile_s=round(time.perf_counter() - start, 2))
    return row


_JOBS: list[Job] = []


def _run_index(i: int) -> dict:
    return _compile(_JOBS[i])


def compile_rows(all_jobs: list[Job], jobs_in_parallel: int = 1, progress: bool = False,
                 checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Compile every job (each distinct specialization once, in `jobs_in_parallel` forked processes); one row
    per job, in order. A row is ok when it compiled, its shared memory fits the target's limit and is at most the
    launcher's estimate (the estimate decides which configs are offered, so it must be an upper bound).
    `checkpoint(rows)` gets the rows compiled so far every 25 compiles, so a cut run keeps them."""
    if common.INTERPRETED:
        raise RuntimeError("gpu_compile needs compiled Triton: run it without TRITON_INTERPRET=1")
    global _JOBS
    keys = [_key(job) for job in all_jobs]
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    _JOBS = [all_jobs[i] for i in first.values()]
    by_key: dict[str, dict] = {}
    unique = list(first)

    def done(i: int, res: dict) -> None:
        by_key[unique[i]] = res
        if progress:
            _progress(i, len(_JOBS), _JOBS[i], res)
        if checkpoint and (i + 1) % 25 == 0:
            checkpoint(_rows(all_jobs, keys, by_key))

    with tempfile.TemporaryDirectory(prefix="llmcompress-gpu-compile-") as cache:
        # A fresh Triton cache: a cached kernel skips ptxas, whose log gives registers and spills.
        triton.knobs.cache.dir = cache
        triton.knobs.nvidia.dump_ptxas_log = True
        if jobs_in_parallel > 1:
            with multiprocessing.get_context("fork").Pool(jobs_in_parallel) as pool:
                for i, res in enumerate(pool.imap(_run_index, range(len(_JOBS)))):
                    done(i, res)
        else:
            for i in range(len(_JOBS)):
                done(i, _run_index(i))
    return _rows(all_jobs, keys, by_key)


def _rows(all_jobs: list[Job], keys: list[str], by_key: dict[str, dict]) -> list[dict]:
    rows = []
    for job, key in zip(all_jobs, keys):
        if key not in by_key:
            continue
        row = {**_row_head(job.case, job.launch, job.config, job.target), "offered": job.offered}
        if job.shared_estimate is not None:
            row["shared_estimate"] = job.shared_estimate
        row.update(by_key[key])
        if "error" not in row:
            row["ok"] = row["shared"] <= row["shared_limit"] and row["shared"] <= row.get("shared_estimate",
                                                                                          row["shared"])
        rows.append(row)
    return rows


def _progress(i: int, total: int, job: Job, res: dict) -> None:
    print(f"[{i + 1}/{total}] {job.launch.kernel.__name__} {job.case.dtype} {job.case.variant} M={job.case.shape[0]} "
          f"{job.target} {_config_dict(job.config, job.launch)}: {res.get('error', '')[:300]} regs={res.get('regs')} "
          f"spill={res.get('spill_stores')} shared={res.get('shared')}/{job.shared_estimate} "
          f"{res.get('compile_s')} s", file=sys.stderr, flush=True)


def reduced_jobs(all_jobs: list[Job]) -> list[Job]:
    """One job per kernel, variant, dtype and target: the offered config with the largest shared-memory estimate
    (the one nearest the limit), at the first shape that launches the kernel."""
    best: dict[tuple, Job] = {}
    for job in all_jobs:
        key = (job.case.family, job.launch.kernel.__name__, job.case.variant, job.case.dtype, job.target)
        if key not in best or (job.case.shape == best[key].case.shape
                               and (job.shared_estimate or 0) >= (best[key].shared_estimate or 0)):
            best[key] = job
    return list(best.values())


def unsupported() -> str | None:
    """Why this Triton cannot compile ahead of time here, or None: the launch binder used (`_specialize`) is
    Triton 3.9's."""
    from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401 - present since 3.3

    if not hasattr(JITFunction, "_pack_args"):
        return f"gpu_compile needs Triton 3.9's launch binder (JITFunction._pack_args); this is Triton " \
               f"{triton.__version__}"
    return None


def run_reduced(families: str, folder: str | os.PathLike, timeout: float = 900) -> list[dict]:
    """The reduced set's rows for `families` ("kernels", "sparse", "lowrank", "moe", "moe-int4", "moe-int8",
    "codegen"), compiled in a subprocess without TRITON_INTERPRET (the tests' process runs the interpreter; compiling
    needs no GPU). Runs this checkout's package: the subprocess starts in the directory above `llmcompress/`."""
    root = pathlib.Path(__file__).resolve().parents[2]
    out = pathlib.Path(folder) / f"gpu_compile_{families}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "llmcompress.testing.gpu_compile", "--set", "reduced",
                           "--families", families, "--jobs", "2", "--out", str(out)],
                          check=False, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"gpu_compile failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())["rows"]


def check_row(row: dict) -> None:
    """AssertionError naming the kernel unless the row compiled, fits the target's shared memory and the launcher's
    estimate of it, and does not spill."""
    what = f"{row['kernel']} {row['dtype']} {row['variant']} {row['target']} {row['config']}"
    assert "error" not in row, f"{what}: {row['error']}"
    assert row["shared"] <= row["shared_limit"], f"{what}: {row['shared']} B of shared memory per block"
    assert row["shared"] <= row.get("shared_estimate", row["shared"]), \
        f"{what}: {row['shared']} B of shared memory, the launcher estimated {row['shared_estimate']}"
    assert row["spill_stores"] == 0, f"{what}: spills {row['spill_stores']} B per thread"
    assert row["ok"] and row["regs"] > 0, f"{what}: {row}"


def environment() -> dict:
    import platform

    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("full", "reduced"), default="reduced")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated: {', '.join(FAMILIES)}")
    parser.add_argument("--targets", default="sm_90,sm_80")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--jobs", type=int, default=1, help="compiles in parallel (forked processes)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    # Triton 3.9 warns once that the default will change; keep today's (fused multiply-add on) and say so.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    targets = args.targets.split(",")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; allowed: {sorted(TARGETS)}")
    start = time.perf_counter()
    all_jobs, skipped = jobs(cases(args.set == "full", tuple(args.families.split(",")), tuple(args.dtypes.split(","))),
                             targets, pruned=args.set == "full")
    if args.set == "reduced":
        all_jobs = reduced_jobs(all_jobs)
    head = {"set": args.set, "command": " ".join(sys.argv),
            "targets": {t: {"capability": c, "shared_limit": s} for t, (c, s) in TARGETS.items() if t in targets},
            "device": {"type": "cpu", "name": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(),
                       "gpu": None, "compiled_for": targets},
            "environment": environment(), "jobs": args.jobs, "compiles": len({_key(j) for j in all_jobs})}

    def write(rows: list[dict], complete: bool) -> None:
        result = {**head, "complete": complete, "wall_s": round(time.perf_counter() - start, 1),
                  "rows": skipped + rows}
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)

    rows = compile_rows(all_jobs, args.jobs, args.progress, checkpoint=lambda r: write(r, False))
    write(rows, True)
    rows = skipped + rows
    failed = [r for r in rows if not r["ok"]]
    print(f"gpu_compile: {head['compiles']} compiles, {len(failed)} failed rows, "
          f"{round(time.perf_counter() - start, 1)} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
