"""Runtime expert-load counters of fused MoE blocks: per block, the tokens routed to each expert and the sum of their
routing weights, accumulated on the device by `llmcompress::moe_count_load` (atomics; no host sync, so the block
still captures in CUDA graphs).

`fuse-moe` with option `load_counters: true` allocates one `LoadCounter` per block it fuses (`new_counter`, on the
experts' device, before any capture) and puts `moe_count_load(topk_weights, topk_ids, key)` between `moe_route` and
`moe_experts`. Read them with `moe_load_counters(model)` (re-exported as `llmcompress.moe_load_counters`), zero them
with `reset_moe_load_counters(model)`.

The op returns a copy of topk_ids, which `moe_experts` reads: a graph keeps only what its outputs need, so an op
whose result nobody used would be dropped; the copy is T·k int32, nothing beside the experts' weights. The buffers are
found from the key in a registry, not passed as graph constants: a graph constant the op wrote in place would be a
mutation the functional graph does not show (and Inductor would be free to assume it unchanged).
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Any

import torch
import triton
import triton.language as tl

from llmcompress.cost.roofline import io_bytes, numel, register_cost
from llmcompress.kernels import linear_common as common

__all__ = ["LoadCounter", "moe_count_load_reference", "moe_count_load_triton", "moe_load_counters", "new_counter",
           "reset_moe_load_counters"]


@dataclasses.dataclass(eq=False)  # identity: field-wise equality would compare the count tensors
class LoadCounter:
    name: str
    """The block's module path (`model.layers.0.mlp`)."""
    tokens: torch.Tensor
    """(E,) int64: slots routed to each expert (a token counts once per expert it picked)."""
    weight_sum: torch.Tensor
    """(E,) float32: the sum of those slots' routing weights."""
    sources: list[Any]
    """Weak references to the block's frozen weights (router, experts): how `moe_load_counters` finds the model."""
    experts: list[int]
    """The original id of each counted expert, by position (`range(E)` unless `moe-prune` removed experts)."""


_COUNTERS: dict[int, LoadCounter] = {}
_KEYS = itertools.count()


def new_counter(name: str, num_experts: int, device: torch.device | str, weights: list[torch.Tensor],
                expert_ids: list[int] | None = None) -> int:
    """Allocate a block's zeroed counters on `device` and return the key `moe_count_load` takes; `weights` are the
    block's frozen tensors (some of the module's own storage), by which `moe_load_counters(model)` finds it;
    `expert_ids` the original id of each of the block's experts (default `range(num_experts)`)."""
    ids = list(range(num_experts)) if expert_ids is None else [int(i) for i in expert_ids]
    if len(ids) != num_experts:
        raise ValueError(f"new_counter: {len(ids)} expert ids for {num_experts} experts")
    key = next(_KEYS)
    _COUNTERS[key] = LoadCounter(name, torch.zeros(num_experts, dtype=torch.int64, device=device),
                                 torch.zeros(num_experts, dtype=torch.float32, device=device),
                                 [weakref.ref(w) for w in weights], ids)
    return key


def drop_counter(key: int) -> None:
    """Forget a counter (a rewrite undone before it ran)."""
    _COUNTERS.pop(key, None)


def zero_counter(key: int) -> None:
    c = counter(key)
    c.tokens.zero_()
    c.weight_sum.zero_()


def counter(key: int) -> LoadCounter:
    if key not in _COUNTERS:
        raise KeyError(f"moe_count_load: no load counter {key} (allocated by fuse-moe's load_counters)")
    return _COUNTERS[key]


def _storages(model: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}


def _of(model: torch.nn.Module) -> list[LoadCounter]:
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    owned = _storages(model)
    found = []
    for c in _COUNTERS.values():
        alive = [w() for w in c.sources]
        if any(t is not None and t.untyped_storage().data_ptr() in owned for t in alive):
            found.append(c)
    return found


def moe_load_counters(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """{block: {"tokens": (E,) int64, "mean_weight": (E,) float32 (0 where no token came), "experts": the original
    id of each position (E ids: the kept ones where `moe-prune` removed experts), "graphs": graphs counting}} of a
    model compiled with fuse-moe's `load_counters: true` (the compiled or the original module), summed over the
    graphs that run the block (e.g. prefill and decode). Copies on the CPU: this read syncs."""
    out: dict[str, dict[str, Any]] = {}
    for c in _of(model):
        entry = out.setdefault(c.name, {"tokens": torch.zeros_like(c.tokens, device="cpu"),
                                        "weight_sum": torch.zeros_like(c.weight_sum, device="cpu"), "graphs": 0,
                                        "experts": c.experts})
        if entry["experts"] != c.experts:
            raise ValueError(f"moe_load_counters: {c.name}'s graphs count different experts ({entry['experts']} "
                             f"and {c.experts})")
        entry["tokens"] += c.tokens.cpu()
        entry["weight_sum"] += c.weight_sum.cpu()
        entry["graphs"] += 1
    for entry in out.values():
        ws = entry.pop("weight_sum")
        entry["mean_weight"] = torch.where(entry["tokens"] > 0, ws / entry["tokens"].clamp_min(1), 0.0)
    return dict(sorted(out.items(), key=lambda kv: _layer_order(kv[0])))


def _layer_order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in name.split("."))


def reset_moe_load_counters(model: torch.nn.Module) -> None:
    """Zero the model's counters (on the device, no sync)."""
    for c in _of(model):
        c.tokens.zero_()
        c.weight_sum.zero_()


@triton.jit
def _moe_count_kernel(ids_ptr, weights_ptr, out_ids_ptr, tokens_ptr, weight_sum_ptr, N, E, BLOCK: tl.constexpr):
    rs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rs < N
    e = tl.load(ids_ptr + rs, mask=mask, other=-1)
    w = tl.load(weights_ptr + rs, mask=mask, other=0.0)
    tl.store(out_ids_ptr + rs, e, mask=mask)
    hit = mask & (e >= 0) & (e < E)
    tl.atomic_add(tokens_ptr + e, tl.full((BLOCK,), 1, tl.int64), mask=hit)
    tl.atomic_add(weight_sum_ptr + e, w, mask=hit)


# 1,024 slots per program: decode's T·k (2-16) is one program; the atomics, not the launch width, bound it.
_BLOCK = 1024


def moe_count_load_reference(topk_weights: torch.Tensor, topk_ids: torch.Tensor, tokens: torch.Tensor,
                             weight_sum: torch.Tensor) -> torch.Tensor:
    """Add each slot to its expert's count and weight sum in place (ids outside [0, E) count nowhere); returns a
    copy of topk_ids. The CPU path and the kernel's oracle."""
    ids = topk_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < tokens.shape[0])
    tokens.index_add_(0, ids[valid], torch.ones_like(ids[valid]))
    weight_sum.index_add_(0, ids[valid], topk_weights.reshape(-1)[valid].to(weight_sum.dtype))
    return topk_ids.clone()


def _check(topk_weights: torch.Tensor, topk_ids: torch.Tensor, c: LoadCounter) -> None:
    name = "moe_count_load"
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32:
        raise ValueError(f"{name}: topk_ids must be int32 (T, k), got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.dtype != torch.float32 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{name}: topk_weights must be float32 {tuple(topk_ids.shape)}, got {topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}")
    if c.tokens.device != topk_ids.device:
        raise ValueError(f"{name}: the counters of {c.name} are on {c.tokens.device}, the routing on "
                         f"{topk_ids.device}: compile on the device the model runs on")


def moe_count_load_triton(topk_weights: torch.Tensor, topk_ids: torch.Tensor, tokens: torch.Tensor,
                          weight_sum: torch.Tensor) -> torch.Tensor:
    """As `moe_count_load_reference`, on a Triton device (CPU only under TRITON_INTERPRET=1): one launch, atomics."""
    common.check_launchable("moe_count_load_triton", topk_ids, "moe_count_load_reference")
    out = torch.empty_like(topk_ids)
    n = topk_ids.numel()
    if n:
        common.wrap(_moe_count_kernel)[(triton.cdiv(n, _BLOCK),)](
            topk_ids.contiguous(), topk_weights.contiguous(), out, tokens, weight_sum, n, tokens.shape[0],
            BLOCK=_BLOCK, num_warps=4)
    return out


@torch.library.custom_op("llmcompress::moe_count_load", mutates_args=())
def moe_count_load(topk_weights: torch.Tensor, topk_ids: torch.Tensor, key: int) -> torch.Tensor:
    """Count the routing (T, k) into load counter `key` (`new_counter`) and return a copy of topk_ids. Opaque on
    purpose (a plain custom op, not a triton_op): the counters are looked up at run time, never traced into a
    graph as constants."""
    c = counter(key)
    _check(topk_weights, topk_ids, c)
    if topk_ids.device.type == "cuda":
        return moe_count_load_triton(topk_weights, topk_ids, c.tokens, c.weight_sum)
    return moe_count_load_reference(topk_weights, topk_ids, c.tokens, c.weight_sum)


@moe_count_load.register_fake
def _(topk_weights, topk_ids, key):
    return torch.empty_like(topk_ids)


@register_cost(torch.ops.llmcompress.moe_count_load.default)
def _moe_count_load_cost(node):
    """(flops, bytes): one add per slot; the ids and weights read, the ids written (the atomics on E counters stay
    in L2)."""
    return numel(node.args[1].meta["val"]), io_bytes(node)
