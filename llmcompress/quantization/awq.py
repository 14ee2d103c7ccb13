"""AWQ (Lin et al. 2023, github.com/mit-han-lab/llm-awq): activation-aware int4 weight quantization of one linear
layer. Input channels with large activations get their weights scaled up by s before round-to-nearest (so they lose
less precision) and the input scaled down by 1/s; then each group's range may be clipped.

Entry point: `awq_search(w, x)`, which returns the int4 group format of `formats.py` plus the per-input-channel
`act_scale` (K,) = 1/s that the kernel multiplies x by: y ~= (x * act_scale) @ dequantize_int4(...).T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcompress.errors import OptionError
from llmcompress.quantization import formats
from llmcompress.quantization.formats import _TINY

# Mean |x| below this counts as this: a dead channel would otherwise make s = a^alpha zero and 1/s infinite.
_MIN_ACT = 1e-5
# Float32 elements of the temporaries of one batch of output channels (~256 MiB): a 11008x4096 layer with 4096
# rows then runs in a handful of batches, each a large matmul.
_BATCH_ELEMS = 1 << 26
# Rows at a time when reducing mean |x| over all calibration rows, so x is never copied whole into float32.
_ACT_CHUNK_ROWS = 8192


@dataclass
class AWQResult:
    """qweight uint8 (N, K // 2), scales/zeros float16 (N, K // group_size): the int4 format; act_scale float32
    (K,) = 1/s; alpha: the chosen exponent (0 = plain round-to-nearest); loss_rtn / loss_awq: mean square output
    error of plain RTN and of this result on the evaluation rows; clipped: whether the range clipping was kept."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    act_scale: torch.Tensor
    alpha: float
    loss_rtn: float
    loss_awq: float
    clipped: bool


def _fake_quant(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int4 min/max quantization of grouped weights wg (n, G, g) to the range [lo, hi] (n, G, 1), by the rule of
    `formats.int4_scales_zeros` + `formats.quantize_int4_rtn` (codes rounded with the float16 scale).
    Returns (codes float32 (n, G, g), scale16 as float32 (n, G, 1), zero float32 (n, G, 1))."""
    scale = ((hi - lo) / 15.0).clamp_min(_TINY)
    zero = torch.round(-lo / scale).clamp_(0, 15)
    scale16 = scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny).float()
    q = torch.round(wg / scale16 + zero).clamp_(0, 15)
    return q, scale16, zero


def _range(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max of each group of wg (n, G, g), widened to hold 0 as `formats.int4_scales_zeros` does."""
    return wg.amin(dim=2, keepdim=True).clamp(max=0.0), wg.amax(dim=2, keepdim=True).clamp(min=0.0)


def _dequant(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    q, scale, zero = _fake_quant(wg, lo, hi)
    return (q - zero) * scale


def _even_rows(t: int, m: int, device: torch.device) -> torch.Tensor:
    """m row indices spread evenly over [0, t): calibration rows come sequence after sequence, so a stride covers
    every sequence where the first m rows would not."""
    return torch.linspace(0, t - 1, m, device=device).round().long()


def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    """x (T, K) -> mean_t |x_tk| (K,) float32, reduced in chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _ACT_CHUNK_ROWS):
        total += x[start:start + _ACT_CHUNK_ROWS].float().abs().sum(dim=0)
    return total / x.shape[0]


def _batch(n: int, elems_per_row: int) -> int:
    return max(1, min(n, _BATCH_ELEMS // max(1, elems_per_row)))


def _clip_ranges(ws: torch.Tensor, xs: torch.Tensor, group_size: int, n_clip_grid: int, max_shrink: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's range clipping: for each group of ws (N, K) (the scaled weights), the shrink of its [min, max] range
    among 1, 1 - 1/n_clip_grid, ... (down to 1 - max_shrink) that minimizes that group's mean square output error
    on the rows xs (S, K) (the scaled inputs). Returns lo, hi (N, G, 1).

    The reference clips symmetrically at +-max|w|; our format is asymmetric, so both ends shrink by the same factor.
    """
    n, k = ws.shape
    n_groups = k // group_size
    s = xs.shape[0]
    xg = xs.reshape(s, n_groups, group_size).transpose(0, 1)  # (G, S, g)
    factors = [1.0 - i / n_clip_grid for i in range(int(max_shrink * n_clip_grid) + 1)]
    lo_all = torch.empty(n, n_groups, 1, dtype=torch.float32, device=ws.device)
    hi_all = torch.empty_like(lo_all)
    step = _batch(n, n_groups * s + 4 * k)
    for r0 in range(0, n, step):
        wg = ws[r0:r0 + step].reshape(-1, n_groups, group_size)
        lo, hi = _range(wg)
        best_err = torch.full((wg.shape[0], n_groups, 1), float("inf"), device=ws.device)
        best_f = torch.ones_like(best_err)
        for f in factors:
            dw = _dequant(wg, lo * f, hi * f) - wg  # (n, G, g)
            err = torch.bmm(xg, dw.permute(1, 2, 0)).pow_(2).mean(dim=1)  # (G, n): per-group output error
            err = err.T.unsqueeze(2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_f = torch.where(better, f, best_f)
        lo_all[r0:r0 + step] = lo * best_f
        hi_all[r0:r0 + step] = hi * best_f
    return lo_all, hi_all


def _output_loss(w: torch.Tensor, xs: torch.Tensor, s: torch.Tensor, group_size: int,
                 lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
    """Mean square of xs @ (deq(w * s) / s).T - xs @ w.T over (M, N), a 0-d tensor. w (N, K), xs (M, K),
    s (K,); lo/hi (N, G, 1) clip ranges of the scaled weight (default: its min/max)."""
    n, k = w.shape
    inv_s = 1.0 / s
    m = xs.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=w.device)
    step = _batch(n, 2 * m + 4 * k)
    for r0 in range(0, n, step):
        wb = w[r0:r0 + step].float()
        wg = (wb * s).reshape(wb.shape[0], -1, group_size)
        if lo is None:
            blo, bhi = _range(wg)
        else:
            blo, bhi = lo[r0:r0 + step], hi[r0:r0 + step]
        wq = _dequant(wg, blo, bhi).reshape(wb.shape) * inv_s
        total += (xs @ (wq - wb).T).pow_(2).sum()
    return total / (m * n)


def awq_search(w: torch.Tensor, x: torch.Tensor, *, group_size: int = 128, n_grid: int = 20, clip: bool = True,
               max_rows: int = 4096, n_clip_grid: int = 20, max_shrink: float = 0.5, clip_rows: int = 4096,
               duo: bool = True) -> AWQResult:
    """AWQ scale search (and range clipping) for one linear layer.

    w: (N, K) weight of y = x @ w.T; x: (T, K) or (..., K) the layer's calibration inputs (any float dtype).
    For alpha in linspace(0, 1, n_grid): s = a^alpha with a = mean_t |x_t| (K,), normalized by
    sqrt(max(s) * min(s)); the loss of alpha is the mean square output error of RTN int4 on w * diag(s), scaled
    back, on up to `max_rows` evenly spaced rows of x. Then, if `clip`, each group's range is shrunk to minimize its
    output error on `clip_rows` of those rows; the clipping is kept only if it lowers the loss on the `max_rows`.
    clip_rows 4096 (not 512): tiny-llama w4a16-awq perplexity +1.33 % instead of +1.40 % over dense (CPU run,
    benchmarks/quantized_quality.py method); the clip decisions are noisy on fewer rows.
    duo: also try s = a^alpha / w_mean^(1 - alpha), w_mean the mean of |w| over output channels with each group
    normalized by its max (AutoAWQ's "duo scaling"); the lowest loss over both families wins.
    """
    if w.dim() != 2:
        raise ValueError(f"awq_search: weight must be (N, K), got {tuple(w.shape)}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"awq_search: inputs (..., {k}) expected for weight {tuple(w.shape)}, got {tuple(x.shape)}")
    formats.check_group_size(k, group_size)
    if n_grid < 1 or max_rows < 1 or clip_rows < 1 or n_clip_grid < 1:
        raise OptionError("awq_search: n_grid, max_rows, clip_rows and n_clip_grid must be >= 1")
    if not 0.0 <= max_shrink < 1.0:
        raise OptionError(f"awq_search: max_shrink must be in [0, 1), got {max_shrink!r}")
    x = x.detach().reshape(-1, k).to(w.device)
    if x.shape[0] == 0:
        raise ValueError("awq_search: no calibration rows")
    w = w.detach()

    act = _mean_abs(x).clamp_min(_MIN_ACT)
    m = min(max_rows, x.shape[0])
    xs = x[_even_rows(x.shape[0], m, x.device)].float()

    grid = torch.linspace(0, 1, n_grid).tolist()
    alphas: list[float] = []
    losses = []
    scales = []
    w_mean = None
    if duo:
        wa = w.float().abs().reshape(n, -1, group_size)
        w_mean = (wa / wa.amax(dim=2, keepdim=True).clamp_min(_MIN_ACT)).reshape(n, k).mean(dim=0)
    for family in ("act", "duo") if duo else ("act",):
        for alpha in grid:
            if family == "duo" and alpha in (0.0, 1.0):
                continue  # alpha 1 is the act family's; alpha 0 (1 / w_mean) protects nothing the search needs
            s = act.pow(alpha) if family == "act" else act.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)
            s = s / (s.max() * s.min()).sqrt()
            alphas.append(alpha)
            scales.append(s)
            losses.append(_output_loss(w, xs, s, group_size))
    losses_t = torch.stack(losses)
    best = int(torch.argmin(losses_t))
    s = scales[best]
    inv_s = 1.0 / s
    loss = losses_t[best]

    ws = w.float() * s
    wg = ws.reshape(n, -1, group_size)
    lo, hi = _range(wg)
    clipped = False
    if clip:
        xc = xs[_even_rows(m, min(clip_rows, m), xs.device)] * inv_s
        clo, chi = _clip_ranges(ws, xc, group_size, n_clip_grid, max_shrink)
        clip_loss = _output_loss(w, xs, s, group_size, clo, chi)
        if bool(clip_loss < loss):
            lo, hi, loss, clipped = clo, chi, clip_loss, True

    q, scale16, zero = _fake_quant(wg, lo, hi)
    return AWQResult(
        qweight=formats.pack_int4(q.reshape(n, k).to(torch.uint8)),
        scales=scale16.reshape(n, -1).to(torch.float16),
        zeros=zero.reshape(n, -1).to(torch.float16),
        act_scale=inv_s.contiguous(),
        alpha=float(alphas[best]),
        loss_rtn=float(losses_t[0]),
        loss_awq=float(loss),
        clipped=clipped,
    )
