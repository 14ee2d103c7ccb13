"""Which experts `moe-prune` keeps in one layer, and the router refit: `choose_experts`, `refit_router`.

`reconstruction` (default) keeps the subset whose block output on the calibration tokens is closest to the dense
block's (relative squared error; every subset when there are at most `_EXHAUSTIVE_MAX` of them, else greedy removal
of the expert whose loss hurts least, "Not All Experts are Equal", Lu et al. 2024). `routed-weight` keeps the experts
with the most routing weight summed over the tokens (the issue's baseline). The refit then moves the kept router
rows a few Adam steps towards the dense block's output through the differentiable top-k weights.
"""

from __future__ import annotations

import itertools
import math

import torch

from llmcompress.passes.moe.routing import combine, route

# C(8, 4) = 70 subsets cost about 0.1 s at 8192 tokens, hidden 384; OLMoE's C(64, 32) could never be enumerated.
_EXHAUSTIVE_MAX = 512


def reconstruction_error(y: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, k: int, renormalize: bool,
                         allowed: torch.Tensor) -> float:
    """Relative squared error of the block's output with only `allowed` experts routable, against `target`."""
    w, i = route(logits, k, renormalize, allowed)
    return float(((combine(y, w, i) - target) ** 2).sum() / (target**2).sum().clamp_min(1e-30))


def choose_experts(y: torch.Tensor, logits: torch.Tensor, k: int, renormalize: bool, keep: int, method: str,
                   weight_sum: torch.Tensor | None = None) -> tuple[list[int], float]:
    """(kept expert ids, sorted; the relative reconstruction error with them) for one layer.

    y: (T, E, H) every expert's output on the calibration tokens; logits: (T, E) the router's.
    weight_sum: (E,) routing weight per expert summed over the tokens (`routed-weight`).
    """
    n = logits.shape[-1]
    w, i = route(logits, k, renormalize)
    target = combine(y, w, i)

    def error(kept: tuple[int, ...]) -> float:
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[list(kept)] = True
        return reconstruction_error(y, logits, target, k, renormalize, allowed)

    if method == "routed-weight":
        if weight_sum is None:
            raise ValueError("choose_experts: routed-weight needs weight_sum")
        kept = tuple(sorted(torch.argsort(weight_sum, descending=True, stable=True)[:keep].tolist()))
        return list(kept), error(kept)
    if method != "reconstruction":
        raise ValueError(f"choose_experts: unknown method {method!r} (reconstruction, routed-weight)")
    if math.comb(n, keep) <= _EXHAUSTIVE_MAX:
        best = min(itertools.combinations(range(n), keep), key=error)
        return list(best), error(best)
    kept_list = list(range(n))
    while len(kept_list) > keep:
        drop = min(kept_list, key=lambda e: error(tuple(x for x in kept_list if x != e)))
        kept_list.remove(drop)
    return kept_list, error(tuple(kept_list))


def refit_router(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, kept: list[int],
                 k: int, renormalize: bool, steps: int, lr: float) -> tuple[torch.Tensor, float, float]:
    """(router weight (E, H) with the kept rows refit, error before, error after) on the calibration tokens.

    Minimises the relative squared error between the pruned block's output and the dense block's over the kept
    rows (Adam, `lr` relative to the rows' RMS); the best step is returned, so the error never rises. The other
    rows are left as they are: the graph masks them out.
    x: (T, H) the block's input; weight: (E, H) the router's; y: (T, E, H) every expert's output.
    """
    n = weight.shape[0]
    logits = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    w, i = route(logits, k, renormalize)
    target = combine(y, w, i)
    energy = (target**2).sum().clamp_min(1e-30)
    allowed = torch.zeros(n, dtype=torch.bool)
    allowed[kept] = True
    rows = weight.float()[kept].clone().requires_grad_(True)
    b = None if bias is None else bias.float()[kept]
    y_kept = y[:, kept]
    scale = float(weight.float()[kept].pow(2).mean().sqrt())
    opt = torch.optim.Adam([rows], lr=lr * scale)
    best_rows, best, first = rows.detach().clone(), math.inf, math.inf
    with torch.enable_grad():
        for step in range(steps + 1):
            wk, ik = route(torch.nn.functional.linear(x.float(), rows, b), k, renormalize)
            loss = ((combine(y_kept, wk, ik) - target) ** 2).sum() / energy
            value = loss.item()
            if step == 0:
                first = value
            if value < best:
                best, best_rows = value, rows.detach().clone()
            if step == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = weight.detach().clone()
    out[kept] = best_rows.to(weight.dtype)
    return out, first, best


def error_curve(y: torch.Tensor, logits: torch.Tensor, k: int, renormalize: bool, counts: range,
                method: str = "reconstruction", weight_sum: torch.Tensor | None = None) -> dict[int, float]:
    """{experts kept: relative reconstruction error of the best such subset} of one layer (0 at all E)."""
    n = logits.shape[-1]
    curve = {n: 0.0}
    for c in counts:
        if c < n:
            curve[c] = choose_experts(y, logits, k, renormalize, c, method, weight_sum)[1]
    return curve


def allocate_counts(curves: list[dict[int, float]], total: int) -> list[int]:
    """Experts kept per layer, summing to `total`, that keep the sum of the layers' relative errors small: start
    from every expert and repeatedly remove one from the layer where that costs least (curves: `error_curve`)."""
    counts = [max(c) for c in curves]
    if total > sum(counts) or total < sum(min(c) for c in curves):
        raise ValueError(f"allocate_counts: {total} experts cannot be kept within the layers' bounds")
    while sum(counts) > total:
        cost = [(curves[i][counts[i] - 1] - curves[i][counts[i]], i) for i in range(len(curves))
                if counts[i] - 1 in curves[i]]
        counts[min(cost)[1]] -= 1
    return counts


# Joint least squares over the kept experts' down projections: a (kept · I)² float64 Gram matrix; 8192 features
# (512 MiB) bounds it. tiny-mixtral keeps 6 × 256 = 1536 (18 MiB); Mixtral-8x7B's 6 × 14336 is past it.
_CORRECT_MAX_FEATURES = 8192


def correct_down(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, logits: torch.Tensor, kept: list[int],
                 k: int, renormalize: bool, target: torch.Tensor, ridge: float) -> torch.Tensor | None:
    """(E, H, I) down projections with the kept experts' rows refit jointly, by ridge least squares, so that the
    pruned block's output on the calibration tokens approaches `target` (the dense block's); None when the
    kept experts have too many features (`_CORRECT_MAX_FEATURES`).

    The routing is the pruned router's (`logits` with the removed experts masked); the features of a token are
    its kept experts' SiLU·up activations times their routing weights, so the block's output is linear in the
    down projections. The ridge pulls toward the original weights: `ridge` × the Gram matrix's mean diagonal
    (on tiny-mixtral, 8 -> 6, 32 windows: ridge 0.001 +2.93 %, 0.01 +2.73 %, 0.1 +2.48 %; the calibration tokens
    are training text the model has seen, so a loose fit overfits them).
    """
    n, _, i = down.shape
    if len(kept) * i > _CORRECT_MAX_FEATURES:
        return None
    allowed = torch.zeros(n, dtype=torch.bool)
    allowed[kept] = True
    w, idx = route(logits, k, renormalize, allowed)
    xf = x.float()
    feats = torch.empty(x.shape[0], len(kept) * i, dtype=torch.float64)
    for j, e in enumerate(kept):
        gate, up = torch.nn.functional.linear(xf, gate_up[e].float()).chunk(2, dim=-1)
        weight = (w * (idx == e)).sum(-1, keepdim=True)
        feats[:, j * i:(j + 1) * i] = (weight * torch.nn.functional.silu(gate) * up).double()
    gram = feats.T @ feats
    original = torch.cat([down[e].T for e in kept]).double()  # (kept · I, H)
    reg = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    solved = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=torch.float64),
                                feats.T @ target.double() + reg * original)
    out = down.detach().clone()
    for j, e in enumerate(kept):
        out[e] = solved[j * i:(j + 1) * i].T.to(down.dtype)
    return out
