"""Fused MoE routing: router logits -> top-k weights and ids -> tokens sorted and block-aligned by expert.

Entry point: `torch.ops.llmcompress.moe_route(router_logits, top_k, scoring="softmax", norm_topk_prob=True,
block_m=16, skip_beta=0.0)` -> (topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded), the inputs of
`llmcompress::moe_experts` (`moe_experts.py`). CUDA runs `moe_route_triton` (two kernels, no host sync: every
output size is a function of T, E, top_k and block_m only); CPU runs the opaque op `llmcompress::moe_route_cpu` (the
reference's top-k, the layout built on the host by `moe_align_host`); `moe_route_reference` is the oracle.

Args of the op:
    router_logits: (T, E) float16/bfloat16/float32, the router linear's output (any strides).
    top_k: 1 <= top_k <= E experts per token.
    scoring: "softmax" (Mixtral, Qwen2-MoE, OLMoE: softmax over all E in float32, then top-k) or "sigmoid"
        (each expert's score is sigmoid(logit)). Qwen2-MoE's sigmoid *shared-expert gate* is not the router: it is
        a separate (1, H) linear the pass keeps beside these ops.
    norm_topk_prob: divide the k weights by their sum (Mixtral always; Qwen2-MoE and OLMoE per their config).
    block_m: rows of one block of the experts' grouped GEMM (16, 32, 64 or 128; `moe_path.choose_moe_path`).
    skip_beta: dynamic expert skipping, in [0, 1): slot j of a token is dropped when its weight (after
        `norm_topk_prob`) < skip_beta × the token's top weight: its id becomes E + its expert's id (out of range,
        and still telling which expert the slot had: `moe_skip_compensate` reads it) and its weight is kept; it is
        in no block of the aligned layout, so `moe_experts` reads nothing for it (ids outside [0, E) add nothing).
        The kept slots' weights are not rescaled. 0 skips nothing (the model's routing exactly).

Returns:
    topk_weights: (T, top_k) float32, in rank order (highest score first).
    topk_ids: (T, top_k) int32 (E + the expert's id for a skipped slot).
    sorted_ids: (T·top_k + E·(block_m − 1),) int32: slot ids s = t·top_k + j grouped by expert (in slot order within
        an expert), each expert's run padded with the sentinel T·top_k to a multiple of block_m; past
        `num_padded`, sentinels. This is vLLM's `moe_align_block_size` layout.
    block_expert_ids: (ceil(len(sorted_ids) / block_m),) int32: the expert of each block of sorted_ids, -1 past
        `num_padded`.
    num_padded: (1,) int32: the used length of sorted_ids (a multiple of block_m), read by the kernels on device.

Ties: top-k ranks the logits themselves (softmax and sigmoid are monotonic, so the set is the model's), and of equal
logits takes the lowest expert index first. `torch.topk` does not promise an order on ties (on the CPU,
topk([1, 3, 3, 2, 3], 3) gives indices [2, 4, 1]), so on exact ties the ids can differ from the eager model's in
order, and where a tie straddles the k-th place, in which expert is kept; ties never occur between distinct
logits. Ids outside [0, E) (a skipped slot's E + id) are in no expert's run of the layout, in the reference, the host
layout and the align kernel alike. NaN logits give unspecified ids, as in the eager model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from llmcompress.cost.roofline import io_bytes, numel, register_cost
from llmcompress.kernels import linear_common as common

SCORINGS = ("softmax", "sigmoid")
BLOCK_MS = (16, 32, 64, 128)

__all__ = ["BLOCK_MS", "SCORINGS", "moe_align_host", "moe_align_reference", "moe_route_reference",
           "moe_route_triton", "padded_sizes"]


@triton.jit
def _moe_topk_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    skip_beta,
    SIGMOID: tl.constexpr,
    NORM: tl.constexpr,
    SKIP: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per BLOCK_T tokens, the whole row of E logits in registers; k rounds of (max, lowest index of
    # the max) over the experts not yet taken.
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, BLOCK_E)
    rk = tl.arange(0, BLOCK_K)
    t_mask = rt < T
    e_mask = re < E
    rt64 = rt.to(tl.int64)
    s = tl.load(logits_ptr + rt64[:, None] * stride_lt + re[None, :] * stride_le,
                mask=t_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
    s = tl.where(e_mask[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    denom = tl.sum(tl.where(e_mask[None, :], tl.exp(s - row_max[:, None]), 0.0), axis=1)
    free = e_mask[None, :] & (rt >= 0)[:, None]  # (BLOCK_T, BLOCK_E): experts not yet taken
    w_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    i_tile = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        cand = tl.where(free, s, float("-inf"))
        best = tl.max(cand, axis=1)
        idx = tl.min(tl.where(free & (cand == best[:, None]), re[None, :], BLOCK_E), axis=1)
        free = free & (re[None, :] != idx[:, None])
        if SIGMOID:
            w = 1.0 / (1.0 + tl.exp(-best))
        else:
            w = tl.exp(best - row_max) / denom
        w_tile = tl.where(rk[None, :] == j, w[:, None], w_tile)
        i_tile = tl.where(rk[None, :] == j, idx[:, None], i_tile)
    if NORM:
        w_tile = w_tile / tl.sum(w_tile, axis=1)[:, None]
    if SKIP:
        # Column 0 holds the top weight (rank order); the padding columns past TOP_K are never stored.
        top = tl.sum(tl.where(rk[None, :] == 0, w_tile, 0.0), axis=1)
        i_tile = tl.where(w_tile < skip_beta * top[:, None], E + i_tile, i_tile)
    offs = rt64[:, None] * TOP_K + rk[None, :]
    o_mask = t_mask[:, None] & (rk < TOP_K)[None, :]
    tl.store(weights_ptr + offs, w_tile, mask=o_mask)
    tl.store(ids_ptr + offs, i_tile, mask=o_mask)


@triton.jit
def _moe_align_kernel(
    ids_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_padded_ptr,
    N,
    E,
    max_padded,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # One program: the counts, offsets and ranks need every slot (as vLLM's moe_align_block_size for one block).
    # Three passes over the N = T·k ids, CHUNK at a time as a (CHUNK, BLOCK_E) one-hot tile.
    re = tl.arange(0, BLOCK_E)
    rc = tl.arange(0, CHUNK)
    e_ok = re < E
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for s0 in range(0, N, CHUNK):
        rs = s0 + rc
        e = tl.load(ids_ptr + rs, mask=rs < N, other=-1)
        counts += tl.sum(((e[:, None] == re[None, :]) & e_ok[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr + rc, total + tl.zeros((CHUNK,), dtype=tl.int32), mask=rc < 1)
    for p0 in range(0, max_padded, CHUNK):
        rp = p0 + rc
        tl.store(sorted_ptr + rp, N + tl.zeros((CHUNK,), dtype=tl.int32), mask=rp < max_padded)
    for b0 in range(0, max_blocks, CHUNK):
        rb = b0 + rc
        first = rb * BLOCK_M
        # The block's expert: how many experts' padded runs end at or before its first row.
        owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + rb, tl.where(first < total, owner, -1), mask=rb < max_blocks)
    # The sentinel stores above must land before the slot ids overwrite some of them (other threads' stores).
    tl.debug_barrier()
    running = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for s0 in range(0, N, CHUNK):
        rs = s0 + rc
        e = tl.load(ids_ptr + rs, mask=rs < N, other=-1)
        hot = ((e[:, None] == re[None, :]) & e_ok[None, :]).to(tl.int32)
        rank = tl.cumsum(hot, axis=0) - 1 + running[None, :]
        pos = tl.sum(hot * (starts[None, :] + rank), axis=1)
        tl.store(sorted_ptr + pos, rs, mask=(rs < N) & (tl.sum(hot, axis=1) > 0))
        running += tl.sum(hot, axis=0)


def padded_sizes(num_slots, num_experts: int, block_m: int):
    """(len(sorted_ids), len(block_expert_ids)) for num_slots = T·top_k (ints or SymInts): every expert's run may
    add block_m − 1 sentinels."""
    max_padded = num_slots + num_experts * (block_m - 1)
    return max_padded, (max_padded + block_m - 1) // block_m


def _check(router_logits, top_k, scoring, norm_topk_prob, block_m, skip_beta=0.0, name="moe_route") -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"{name}: router_logits must be (T, E), got {tuple(router_logits.shape)}")
    common.check_dtype(name, "router_logits", router_logits.dtype)
    e = router_logits.shape[1]
    if not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ValueError(f"{name}: top_k must be an int in [1, E={e}], got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"{name}: scoring must be one of {SCORINGS}, got {scoring!r}")
    if block_m not in BLOCK_MS:
        raise ValueError(f"{name}: block_m must be one of {BLOCK_MS}, got {block_m!r}")
    if not isinstance(skip_beta, (int, float)) or not 0.0 <= skip_beta < 1.0:
        raise ValueError(f"{name}: skip_beta must be a float in [0, 1) (a slot is skipped when its weight < "
                         f"skip_beta × the top weight; 0 skips nothing), got {skip_beta!r}")


def moe_align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_ids, block_expert_ids, num_padded) of `topk_ids` (T, k) in plain torch, static shapes (traceable);
    the layout in the module docstring."""
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    dev = flat.device
    max_padded, max_blocks = padded_sizes(n, num_experts, block_m)
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    # Slots grouped by expert, in slot order within one (a stable sort).
    order = torch.sort(key, stable=True).indices
    key_sorted = key[order]
    first_of_expert = torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0)  # (E + 1,) unpadded starts
    rank = torch.arange(n, device=dev) - first_of_expert[key_sorted]
    starts_x = torch.cat([starts, starts.new_full((1,), max_padded)])
    pos = torch.where(key_sorted < num_experts, starts_x[key_sorted] + rank, max_padded)
    sorted_ids = torch.full((max_padded + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids = sorted_ids.index_put((pos,), order.to(torch.int32))[:max_padded]
    total = padded.sum()
    first = torch.arange(max_blocks, device=dev) * block_m
    owner = (ends[None, :] <= first[:, None]).sum(1)
    block_expert = torch.where(first < total, owner, -1).to(torch.int32)
    return sorted_ids, block_expert, total.reshape(1).to(torch.int32)


def moe_align_host(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """`moe_align_reference`'s result computed on the host in Python lists: the CPU path (one pass over the T·k ids,
    4 us at decode against 122 us for the reference's dozen small torch ops on tiny-mixtral's 8 experts, this
    contended 2-core machine)."""
    flat = topk_ids.reshape(-1).tolist()
    n = len(flat)
    max_padded, max_blocks = padded_sizes(n, num_experts, block_m)
    counts = [0] * num_experts
    for v in flat:
        if 0 <= v < num_experts:
            counts[v] += 1
    padded = [(c + block_m - 1) // block_m * block_m for c in counts]
    pos, start = [], 0
    for p in padded:
        pos.append(start)
        start += p
    sorted_ids = [n] * max_padded
    for slot, v in enumerate(flat):
        if 0 <= v < num_experts:
            sorted_ids[pos[v]] = slot
            pos[v] += 1
    block_expert = [-1] * max_blocks
    b = 0
    for e, p in enumerate(padded):
        for _ in range(p // block_m):
            block_expert[b] = e
            b += 1
    dev = topk_ids.device
    return (torch.tensor(sorted_ids, dtype=torch.int32, device=dev),
            torch.tensor(block_expert, dtype=torch.int32, device=dev),
            torch.tensor([start], dtype=torch.int32, device=dev))


def _topk_reference(router_logits, top_k, scoring, norm_topk_prob, skip_beta=0.0):
    s = router_logits.to(torch.promote_types(router_logits.dtype, torch.float32))
    ranked = torch.sort(s, dim=-1, descending=True, stable=True)
    ids = ranked.indices[:, :top_k]
    if scoring == "softmax":
        w = torch.softmax(s, dim=-1).gather(1, ids)
    else:
        w = torch.sigmoid(ranked.values[:, :top_k])
    if norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    if skip_beta > 0:
        ids = torch.where(w < skip_beta * w[:, :1], ids + s.shape[1], ids)
    return w, ids.to(torch.int32)


def moe_route_reference(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                        norm_topk_prob: bool = True, block_m: int = 16, skip_beta: float = 0.0):
    """The op's result in plain torch (args and returns: module docstring): the kernels' oracle, static shapes.
    Scores in float32 (float64 for float64 logits); top-k by a stable descending sort of the logits."""
    w, ids = _topk_reference(router_logits, top_k, scoring, norm_topk_prob, skip_beta)
    return (w, ids, *moe_align_reference(ids, router_logits.shape[1], block_m))


# Untuned guesses pending a GPU (none lent when this was written): 16 tokens of up to 64 experts per program hold
# 1,024 fp32 logits over 4 warps (8 per thread); the align kernel's one-hot tile CHUNK x BLOCK_E <= 4,096 int32.
_TOPK_BLOCK_T = 16
_ALIGN_TILE = 4096


def moe_route_triton(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                     norm_topk_prob: bool = True, block_m: int = 16, skip_beta: float = 0.0):
    """The op on a Triton device (CPU only under TRITON_INTERPRET=1); args and returns: module docstring."""
    _check(router_logits, top_k, scoring, norm_topk_prob, block_m, skip_beta, "moe_route_triton")
    common.check_launchable("moe_route_triton", router_logits, "moe_route_reference")
    t, e = router_logits.shape
    dev = router_logits.device
    n = t * top_k
    max_padded, max_blocks = padded_sizes(n, e, block_m)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=dev)
    sorted_ids = torch.empty((max_padded,), dtype=torch.int32, device=dev)
    block_expert = torch.empty((max_blocks,), dtype=torch.int32, device=dev)
    num_padded = torch.empty((1,), dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(e)
    if t > 0:
        common.wrap(_moe_topk_kernel)[(triton.cdiv(t, _TOPK_BLOCK_T),)](
            router_logits, weights, ids, t, e, router_logits.stride(0), router_logits.stride(1), float(skip_beta),
            SIGMOID=scoring == "sigmoid", NORM=norm_topk_prob, SKIP=skip_beta > 0, TOP_K=top_k, BLOCK_T=_TOPK_BLOCK_T, BLOCK_E=block_e,
            BLOCK_K=triton.next_power_of_2(top_k), num_warps=4)
    common.wrap(_moe_align_kernel)[(1,)](
        ids, sorted_ids, block_expert, num_padded, n, e, max_padded, max_blocks,
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=max(16, _ALIGN_TILE // block_e), num_warps=4)
    return weights, ids, sorted_ids, block_expert, num_padded


@torch.library.custom_op("llmcompress::moe_route_cpu", mutates_args=())
def _moe_route_cpu_op(router_logits: torch.Tensor, top_k: int, scoring: str, norm_topk_prob: bool, block_m: int,
                      skip_beta: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_route's CPU path: the reference's top-k, the layout on the host (`moe_align_host`); opaque to tracing."""
    w, ids = _topk_reference(router_logits, top_k, scoring, norm_topk_prob, skip_beta)
    return (w, ids, *moe_align_host(ids, router_logits.shape[1], block_m))


@_moe_route_cpu_op.register_fake
def _(router_logits, top_k, scoring, norm_topk_prob, block_m, skip_beta=0.0):
    t, e = router_logits.shape
    max_padded, max_blocks = padded_sizes(t * top_k, e, block_m)
    new = router_logits.new_empty
    return (new((t, top_k), dtype=torch.float32), new((t, top_k), dtype=torch.int32),
            new((max_padded,), dtype=torch.int32), new((max_blocks,), dtype=torch.int32), new((1,), dtype=torch.int32))


@triton_op("llmcompress::moe_route", mutates_args=())
def _moe_route_op(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax", norm_topk_prob: bool = True,
                  block_m: int = 16, skip_beta: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The body is also the fake impl and is inlined under torch.compile (see rms_norm.py): CPU and meta tensors go
    # to the opaque CPU op here too.
    if router_logits.device.type != "cuda":
        _check(router_logits, top_k, scoring, norm_topk_prob, block_m, skip_beta)
        return torch.ops.llmcompress.moe_route_cpu(router_logits, top_k, scoring, norm_topk_prob, block_m, skip_beta)
    return moe_route_triton(router_logits, top_k, scoring, norm_topk_prob, block_m, skip_beta)


@_moe_route_op.register_kernel("cpu")
def _moe_route_cpu(router_logits, top_k, scoring="softmax", norm_topk_prob=True, block_m=16, skip_beta=0.0):
    _check(router_logits, top_k, scoring, norm_topk_prob, block_m, skip_beta)
    return _moe_route_cpu_op(router_logits, top_k, scoring, norm_topk_prob, block_m, skip_beta)


@register_cost(torch.ops.llmcompress.moe_route_cpu.default)
@register_cost(torch.ops.llmcompress.moe_route.default)
def _moe_route_cost(node):
    """(flops, bytes): per logit an exp, a sum and k max/compare rounds (k + 2 FLOPs); bytes: logits read, the five
    outputs written (`io_bytes`; the align kernel's three reads of the T·k ids are small beside them)."""
    logits = node.args[0].meta["val"]
    top_k = node.args[1] if len(node.args) > 1 else node.kwargs["top_k"]
    return (top_k + 2) * numel(logits), io_bytes(node)
