"""AWQ (Lin et al. 2023, github.com/mit-han-lab/llm-awq): activation-aware int4 weight quantization of one linear
layer. Input channels with large activations get their weights scaled up by s before round-to-nearest (so they lose
less precision) and the input scaled down by 1/s; then each group's int4 range (scale and zero) is searched.

Entry points: `awq_search(w, x, x_float=None)`, which returns the int4 group format of `formats.py` plus the
per-input-channel `act_scale` (K,) = 1/s that the kernel multiplies x by: y ~= (x * act_scale) @ dequantize_int4(...).T;
and `awq_from_stats(w, act_mean, h, c)`, the same search from statistics of the rows (what quantize-linear uses: the
calibration service accumulates them chunk by chunk and shares them between layers reading the same activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcompress.errors import OptionError
from llmcompress.formats import quantized as formats
from llmcompress.formats.quantized import MIN_SCALE as _TINY

# Mean |x| below this counts as this: a dead channel would otherwise make s = a^alpha zero and 1/s infinite.
_MIN_ACT = 1e-5
# Float32 elements of the temporaries of one batch of work (~256 MiB): output channels for the losses, candidates x
# output channels for the range search.
_BATCH_ELEMS = 1 << 26
# Elements of one candidate batch of the range search on a CPU (4 MiB): the elementwise rounding chain then runs
# near the cache, in place. Measured on a 2-core EPYC, 121 candidates of a 1024 x 128 group column: one thread,
# 0.35 s with 256 MiB batches of fresh temporaries, 0.078 s with these (0.062 s with 1 MiB ones); two threads beside
# a competing process, 0.165 s with these and 0.59 s with 1 MiB ones (many small ops stall on the other's thread).
# A GPU keeps `_BATCH_ELEMS` (fewer, larger launches).
_CPU_CANDIDATE_ELEMS = 1 << 20
# Rows at a time when reducing over the calibration rows, so x is never copied whole into float32.
_ACT_CHUNK_ROWS = 8192
_F16_TINY = torch.finfo(torch.float16).tiny


@dataclass
class AWQResult:
    """qweight uint8 (N, K // 2), scales/zeros float16 (N, K // group_size): the int4 format; act_scale float32
    (K,) = 1/s; alpha: the chosen exponent (0 = plain round-to-nearest); loss_rtn / loss_awq: mean square output
    error of plain RTN and of this result on the calibration rows; clipped: whether the range search was kept."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    act_scale: torch.Tensor
    alpha: float
    loss_rtn: float
    loss_awq: float
    clipped: bool


def _params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Range [lo, hi] -> (scale as stored in float16, returned as float32; zero), by `formats.int4_scales_zeros`."""
    scale = ((hi - lo) / 15.0).clamp_min(_TINY)
    zero = torch.round(-lo / scale).clamp_(0, 15)
    return scale.to(torch.float16).clamp_min(_F16_TINY).float(), zero


def _deq(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest int4 of wg with this scale and zero (broadcasting), dequantized."""
    return (torch.round(wg / scale + zero).clamp_(0, 15) - zero) * scale


def _range(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max of each group of wg (..., g), widened to hold 0 as `formats.int4_scales_zeros` does."""
    return wg.amin(dim=-1, keepdim=True).clamp(max=0.0), wg.amax(dim=-1, keepdim=True).clamp(min=0.0)


def _stats(x: torch.Tensor, x_float: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (T, K) -> (mean_t |x_tk| (K,), H = x.T @ x / T (K, K), C = x.T @ (x - x_float) / T (K, K) or None),
    float32, reduced in chunks.

    With H, the mean square output error of a weight error dW (N, K) over all T rows is sum(dW @ H * dW) / N: every
    row counts, at a cost that does not grow with T. With C, the error against the float model's outputs
    x_float @ W.T adds the term 2 sum(dW * (W @ C.T)) / N (plus a constant)."""
    k = x.shape[1]
    total = torch.zeros(k, dtype=torch.float32, device=x.device)
    h = torch.zeros(k, k, dtype=torch.float32, device=x.device)
    c = None if x_float is None else torch.zeros(k, k, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _ACT_CHUNK_ROWS):
        xc = x[start:start + _ACT_CHUNK_ROWS].float()
        total += xc.abs().sum(dim=0)
        h.addmm_(xc.T, xc)
        if c is not None:
            c.addmm_(xc.T, xc - x_float[start:start + _ACT_CHUNK_ROWS].float())
    return total / x.shape[0], h / x.shape[0], None if c is None else c / x.shape[0]


def _even_rows(t: int, m: int, device: torch.device) -> torch.Tensor:
    """m row indices spread evenly over [0, t): calibration rows come sequence after sequence."""
    return torch.linspace(0, t - 1, m, device=device).round().long()


def _batch(n: int, elems_per_row: int) -> int:
    return max(1, min(n, _BATCH_ELEMS // max(1, elems_per_row)))


def _best_candidate(wj: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, hjj: torch.Tensor | None,
                    cross: torch.Tensor | None, quad: torch.Tensor | None = None, keep_quad: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For one group column wj (n, g) and candidates scales/zeros (C, n, 1): the row error of each candidate,
    d hjj d^T + 2 d . cross with d its dequantization error (cross (n, g): the other groups' coupling, None for
    none), and the index of the best (the first of equals), both (n,).

    The quadratic part depends only on the column and the candidate, not on the other groups: `keep_quad` also
    returns it (C, n) for every candidate, and a later call given it as `quad` (hjj None) adds only the linear part,
    with no matmul (a sweep re-scoring the same grid costs a third). Candidates in batches that fit `_BATCH_ELEMS`
    (`_CPU_CANDIDATE_ELEMS` on a CPU), each computed in place: the same arithmetic as `_deq`."""
    n, g = wj.shape
    best_e = torch.full((n,), float("inf"), device=wj.device)
    best_i = torch.zeros(n, dtype=torch.long, device=wj.device)
    kept = torch.empty(scales.shape[0], n, device=wj.device) if keep_quad else None
    elems = _CPU_CANDIDATE_ELEMS if wj.device.type == "cpu" else _BATCH_ELEMS // 3
    step = max(1, min(scales.shape[0], elems // (n * g)))
    for c0 in range(0, scales.shape[0], step):
        sc, zc = scales[c0:c0 + step], zeros[c0:c0 + step]
        d = torch.div(wj, sc)  # (c, n, g): _deq(wj, sc, zc) - wj, in place
        d.add_(zc).round_().clamp_(0, 15).sub_(zc).mul_(sc).sub_(wj)
        if quad is None:
            e = (d @ hjj).mul_(d).sum(dim=2)
            if kept is not None:
                kept[c0:c0 + step] = e
        else:
            e = quad[c0:c0 + step].clone()
        if cross is not None:
            e.add_(d.mul_(cross).sum(dim=2), alpha=2)
        e_min, i_min = e.min(dim=0)
        better = e_min < best_e
        best_e = torch.where(better, e_min, best_e)
        best_i = torch.where(better, i_min + c0, best_i)
    return best_e, best_i, kept


def _search_ranges(ws: torch.Tensor, h: torch.Tensor, group_size: int, n_clip_grid: int, max_shrink: float,
                   asym: bool, sweeps: int, ls_steps: int, lin: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Int4 scale and zero of each group of ws (N, K) (the scaled weights) minimizing the output error under
    h (K, K) (the scaled inputs' Gram matrix), plus 2 sum(dW * lin) when `lin` (N, K) is given (the pull towards
    the float model's outputs, `_stats`' C). Returns float32 scale (as stored in float16) and zero, (N, G).

    First AWQ's clip: each group alone (its diagonal block of h), among shrinks of its [min, max] range by 1,
    1 - 1/n_clip_grid, ... down to 1 - max_shrink; with `asym` the two ends shrink independently (a 2-D grid: our
    format is asymmetric, the reference's symmetric). Then `sweeps` passes of coordinate descent on each row's whole
    error (the cross-group terms of h included), group after group, over the same candidates plus `ls_steps`
    least-squares refits of the scale to the current codes. Codes stay round-to-nearest of the weights: only the
    ranges move (no error feedback into other weights, which is GPTQ's). A candidate replaces the current choice only
    if it lowers the error, so the row error never increases.
    """
    n, k = ws.shape
    g = group_size
    n_groups = k // g
    factors = torch.tensor([1.0 - i / n_clip_grid for i in range(int(max_shrink * n_clip_grid) + 1)],
                           device=ws.device)
    if asym:
        f_lo, f_hi = factors.repeat_interleave(len(factors)), factors.repeat(len(factors))
    else:
        f_lo = f_hi = factors
    out_s = torch.empty(n, n_groups, dtype=torch.float32, device=ws.device)
    out_z = torch.empty_like(out_s)
    step = _batch(n, 6 * k)
    for r0 in range(0, n, step):
        wg = ws[r0:r0 + step].reshape(-1, n_groups, g)
        lg = None if lin is None else lin[r0:r0 + step].reshape(-1, n_groups, g)
        rows = torch.arange(wg.shape[0], device=ws.device)
        lo, hi = _range(wg)  # (n, G, 1)
        cand_s, cand_z = _params(f_lo[:, None, None] * lo[None, :, :, 0], f_hi[:, None, None] * hi[None, :, :, 0])
        cand_s, cand_z = cand_s[..., None], cand_z[..., None]  # (C, n, G, 1)
        best_s, best_z = cand_s[0, :, :, 0].clone(), cand_z[0, :, :, 0].clone()  # factor 1: min/max
        quads = []  # per group, the grid candidates' quadratic errors (C, n): the sweeps add only their linear part
        for j in range(n_groups):
            sl = slice(j * g, (j + 1) * g)
            _, i, quad = _best_candidate(wg[:, j], cand_s[:, :, j], cand_z[:, :, j], h[sl, sl],
                                         None if lg is None else lg[:, j], keep_quad=sweeps > 0)
            quads.append(quad)
            best_s[:, j], best_z[:, j] = cand_s[i, rows, j, 0], cand_z[i, rows, j, 0]
        dw = _deq(wg, best_s[..., None], best_z[..., None]) - wg  # (n, G, g)
        for _ in range(sweeps):
            for j in range(n_groups):
                sl = slice(j * g, (j + 1) * g)
                hjj, wj = h[sl, sl], wg[:, j]
                cross = dw.reshape(-1, k) @ h[:, sl] - dw[:, j] @ hjj
                if lg is not None:
                    cross += lg[:, j]
                extra_s, extra_z = [best_s[:, j]], [best_z[:, j]]
                sc, z = best_s[:, j:j + 1], best_z[:, j:j + 1]
                for _ in range(ls_steps):
                    # The scale minimizing the row error for the current codes u: e(s u - w) is quadratic in s.
                    u = torch.round(wj / sc + z).clamp_(0, 15) - z
                    num = (u @ hjj * wj).sum(dim=1) - (u * cross).sum(dim=1)
                    den = (u @ hjj * u).sum(dim=1).clamp_min(_TINY)
                    sc = (num / den).clamp_min(_F16_TINY).to(torch.float16).float()[:, None]
                    extra_s.append(sc[:, 0])
                    extra_z.append(z[:, 0])
                extra_s, extra_z = torch.stack(extra_s)[..., None], torch.stack(extra_z)[..., None]
                e_extra, i_extra, _ = _best_candidate(wj, extra_s, extra_z, hjj, cross)
                e_grid, i_grid, _ = _best_candidate(wj, cand_s[:, :, j], cand_z[:, :, j], None, cross, quads[j])
                # The current choice (extras' index 0) and then the refits come first: ties keep them.
                grid = e_grid < e_extra
                best_s[:, j] = torch.where(grid, cand_s[i_grid, rows, j, 0], extra_s[i_extra, rows, 0])
                best_z[:, j] = torch.where(grid, cand_z[i_grid, rows, j, 0], extra_z[i_extra, rows, 0])
                dw[:, j] = _deq(wj, best_s[:, j:j + 1], best_z[:, j:j + 1]) - wj
        out_s[r0:r0 + step] = best_s
        out_z[r0:r0 + step] = best_z
    return out_s, out_z


def _output_loss(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, group_size: int,
                 scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                 lin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean square of x @ (deq(w * s) / s).T - x @ w.T over (T, N), a 0-d tensor, from h = x.T @ x / T. w (N, K),
    s (K,); scale/zero (N, G) of the scaled weight (default: its min/max). With `lin` = w @ C.T (N, K), the error
    against the float model's outputs instead, less a constant."""
    n, k = w.shape
    inv_s = 1.0 / s
    total = torch.zeros((), dtype=torch.float32, device=w.device)
    step = _batch(n, 6 * k)
    for r0 in range(0, n, step):
        wb = w[r0:r0 + step].float()
        wg = (wb * s).reshape(wb.shape[0], -1, group_size)
        if scale is None:
            bs, bz = _params(*_range(wg))
        else:
            bs, bz = scale[r0:r0 + step, :, None], zero[r0:r0 + step, :, None]
        # _deq(wg, bs, bz).reshape(wb.shape) * inv_s - wb, and the error terms, in place (the same arithmetic).
        dw = torch.div(wg, bs).add_(bz).round_().clamp_(0, 15).sub_(bz).mul_(bs).reshape(wb.shape)
        dw.mul_(inv_s).sub_(wb)
        total += (dw @ h).mul_(dw).sum()
        if lin is not None:
            total += 2 * dw.mul_(lin[r0:r0 + step]).sum()
    return total / n


def awq_search(w: torch.Tensor, x: torch.Tensor, *, group_size: int = 128, n_grid: int = 20, clip: bool = True,
               max_rows: int | None = None, n_clip_grid: int = 20, max_shrink: float = 0.5, duo: bool = True,
               asym: bool = True, sweeps: int = 2, ls_steps: int = 3,
               x_float: torch.Tensor | None = None) -> AWQResult:
    """AWQ scale search and range search for one linear layer.

    w: (N, K) weight of y = x @ w.T; x: (T, K) or (..., K) the layer's calibration inputs (any float dtype).
    Every loss is the mean square output error over the rows of x (all of them, or `max_rows` evenly spaced ones),
    computed from H = x.T @ x / T. For alpha in linspace(0, 1, n_grid): s = a^alpha with a = mean_t |x_t| (K,),
    normalized by sqrt(max(s) * min(s)); the loss of alpha is that of RTN int4 on w * diag(s), scaled back.
    duo: also try s = a^alpha / w_mean^(1 - alpha), w_mean the mean of |w| over output channels with each group
    normalized by its max (AutoAWQ's "duo scaling"); the lowest loss over both families wins. Then, if `clip`, the
    range search of `_search_ranges` (asym, sweeps, ls_steps); kept only if it lowers the loss.
    x_float: the same rows' inputs in the float model, when x carries the errors of layers quantized before this
    one. Every loss then measures x @ Wq.T against x_float @ W.T, the float model's outputs, rather than against
    x @ W.T, so the layer makes up for part of the upstream error (C = x.T @ (x - x_float) / T adds a linear term).

    Measured on tiny-llama w4a16-awq (perplexity over dense, benchmarks/quantized_quality.py method, CPU): the
    reference's symmetric clip on 4096 rows +1.33 %; all rows +1.27 % with asym (4096 rows: +1.32 %); with sweeps 2
    and ls_steps 3 +1.19 % and +1.10 % in two runs (the layers' summed output error 0.68 of RTN's, was 0.82); with
    x_float +0.99 % (a 64-window experiment outside the pipeline: +0.86 % vs +1.19 % without). Range search cost:
    per group, C = 121 candidates (11 with asym off) dequantized and multiplied by the (g, g) block once (the
    quadratic terms, kept), then per sweep the same candidates' linear terms only (no matmul) plus 4 candidates in
    full and 2 (N, K) @ (K, g) products for the cross terms: flops of the order of 2 * 121 * N * K * g, about
    1.4e12 for 11008 x 4096 (seconds on a GPU per layer). On tiny-llama's 42 layers (CPU, one thread) the whole
    search takes 17 s, 69 s before the kept quadratic terms and the in-place candidate batches, with the same results
    bit for bit (benchmarks/calibration_time.py times it in the pipeline).
    """
    _, k = _check(w, group_size, n_grid, max_rows, n_clip_grid, max_shrink, sweeps, ls_steps, "awq_search")
    if x.shape[-1] != k:
        raise ValueError(f"awq_search: inputs (..., {k}) expected for weight {tuple(w.shape)}, got {tuple(x.shape)}")
    x = x.detach().reshape(-1, k).to(w.device)
    if x.shape[0] == 0:
        raise ValueError("awq_search: no calibration rows")
    if x_float is not None:
        x_float = x_float.detach().reshape(-1, k).to(w.device)
        if x_float.shape != x.shape:
            raise ValueError(f"awq_search: x_float {tuple(x_float.shape)} must match x {tuple(x.shape)}")
    if max_rows is not None and max_rows < x.shape[0]:
        rows = _even_rows(x.shape[0], max_rows, x.device)
        x = x[rows]
        x_float = None if x_float is None else x_float[rows]
    act, h, c = _stats(x, x_float)
    return awq_from_stats(w, act, h, c, group_size=group_size, n_grid=n_grid, clip=clip, n_clip_grid=n_clip_grid,
                          max_shrink=max_shrink, duo=duo, asym=asym, sweeps=sweeps, ls_steps=ls_steps)


def _check(w: torch.Tensor, group_size: int, n_grid: int, max_rows: int | None, n_clip_grid: int, max_shrink: float,
           sweeps: int, ls_steps: int, where: str) -> tuple[int, int]:
    if w.dim() != 2:
        raise ValueError(f"{where}: weight must be (N, K), got {tuple(w.shape)}")
    n, k = w.shape
    formats.check_group_size(k, group_size)
    if n_grid < 1 or (max_rows is not None and max_rows < 1) or n_clip_grid < 1 or sweeps < 0 or ls_steps < 0:
        raise OptionError(f"{where}: n_grid, max_rows and n_clip_grid must be >= 1, sweeps and ls_steps >= 0")
    if not 0.0 <= max_shrink < 1.0:
        raise OptionError(f"{where}: max_shrink must be in [0, 1), got {max_shrink!r}")
    return n, k


def awq_from_stats(w: torch.Tensor, act_mean: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None, *,
                   group_size: int = 128, n_grid: int = 20, clip: bool = True, n_clip_grid: int = 20,
                   max_shrink: float = 0.5, duo: bool = True, asym: bool = True, sweeps: int = 2, ls_steps: int = 3
                   ) -> AWQResult:
    """`awq_search` from the statistics of the calibration rows instead of the rows: act_mean = mean_t |x_t| (K,),
    h = x.T @ x / T (K, K) and c = x.T @ (x - x_float) / T (K, K) or None (`_stats`; the calibration service
    accumulates them chunk by chunk, `calibration/stats.py`). Same search, same result up to float rounding."""
    n, k = _check(w, group_size, n_grid, None, n_clip_grid, max_shrink, sweeps, ls_steps, "awq_from_stats")
    if tuple(act_mean.shape) != (k,) or tuple(h.shape) != (k, k) or (c is not None and tuple(c.shape) != (k, k)):
        raise ValueError(f"awq_from_stats: act_mean ({k},), h and c ({k}, {k}) expected for weight {tuple(w.shape)}, "
                         f"got {tuple(act_mean.shape)}, {tuple(h.shape)}, {None if c is None else tuple(c.shape)}")
    w = w.detach().float()
    act = act_mean.to(w.device, torch.float32).clamp_min(_MIN_ACT)
    h = h.to(w.device, torch.float32)
    lin = None if c is None else w @ c.to(w.device, torch.float32).T

    grid = torch.linspace(0, 1, n_grid).tolist()
    alphas: list[float] = []
    losses = []
    scales = []
    w_mean = None
    if duo:
        wa = w.abs().reshape(n, -1, group_size)
        w_mean = (wa / wa.amax(dim=2, keepdim=True).clamp_min(_MIN_ACT)).reshape(n, k).mean(dim=0)
    for family in ("act", "duo") if duo else ("act",):
        for alpha in grid:
            if family == "duo" and alpha in (0.0, 1.0):
                continue  # alpha 1 is the act family's; alpha 0 (1 / w_mean) protects nothing the search needs
            s = act.pow(alpha) if family == "act" else act.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)
            s = s / (s.max() * s.min()).sqrt()
            alphas.append(alpha)
            scales.append(s)
            losses.append(_output_loss(w, h, s, group_size, lin=lin))
    losses_t = torch.stack(losses)
    best = int(torch.argmin(losses_t))
    s = scales[best]
    inv_s = 1.0 / s
    loss = losses_t[best]

    wg = (w * s).reshape(n, -1, group_size)
    scale, zero = _params(*_range(wg))
    scale, zero = scale[..., 0], zero[..., 0]
    clipped = False
    if clip:
        cs, cz = _search_ranges(w * s, h * inv_s[:, None] * inv_s[None, :], group_size, n_clip_grid, max_shrink,
                                asym, sweeps, ls_steps, None if lin is None else lin * inv_s)
        clip_loss = _output_loss(w, h, s, group_size, cs, cz, lin)
        if bool(clip_loss < loss):
            scale, zero, loss, clipped = cs, cz, clip_loss, True

    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp_(0, 15)
    return AWQResult(
        qweight=formats.pack_int4(q.reshape(n, k).to(torch.uint8)),
        scales=scale.to(torch.float16),
        zeros=zero.to(torch.float16),
        act_scale=inv_s.contiguous(),
        alpha=float(alphas[best]),
        loss_rtn=float(losses_t[0]),
        loss_awq=float(loss),
        clipped=clipped,
    )
