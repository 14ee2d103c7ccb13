"""Numerics helpers for tests of lossy kernels and quantizers: SQNR in dB, seeded random inputs, synthetic layers.

Every random helper takes a `seed` and draws from its own `torch.Generator`, so results never depend on the global
RNG or on test order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `approx` against `ref` in dB, computed in float64:
    10 log10(Σ ref² / Σ (ref - approx)²)."""
    ref, approx = ref.double(), approx.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum())).item()


def random_activations(shape, dtype: torch.dtype, bias: bool = False, act_scale: bool = False,
                       n: int | None = None, device="cpu", seed: int = 1):
    """x (*shape) ~ N(0, 1) in dtype; optional bias (n,) ~ N(0, 1) in dtype and act_scale (K,) float32 in [0.5, 1.5).

    Returns:
        (x, bias or None, act_scale or None), all on `device`.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    a = (0.5 + torch.rand(shape[-1], generator=g)).to(device) if act_scale else None
    return x, b, a


def random_quantized_linear(shape, n: int, dtype: torch.dtype,
                            quantize_weight: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                            bias: bool = False, smooth: bool = False, device="cpu", seed: int = 0):
    """x (*shape) ~ N(0, 1) in dtype, a float32 weight (n, K) ~ N(0, 1/K) quantized by `quantize_weight` (e.g.
    `formats.quantize_int8_per_channel`), optional bias (n,) ~ N(0, 1) in dtype and smooth (K,) float32 in
    [0.5, 1.5).

    Returns:
        (x, qweight, wscale, bias or None, smooth or None), all on `device`.
    """
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(shape, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    qweight, wscale = quantize_weight(w)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    s = (0.5 + torch.rand(k, generator=g)) if smooth else None

    def move(t):
        return None if t is None else t.to(device)

    return x.to(device, dtype), move(qweight), move(wscale), move(b), move(s)


def per_token_linear_float64(q: torch.Tensor, q_scale: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """The per-token activation x per-channel weight quantized linear in float64 on CPU, without any rounding:
    (q @ qweight.T) * q_scale * wscale (+ bias).

    Args:
        q: (..., K) activation codes; q_scale: (..., 1); qweight: (N, K) codes; wscale: (N,); bias: (N,) or None.

    Returns:
        (..., N) float64 on CPU.
    """
    k = q.shape[-1]
    y = (q.cpu().reshape(-1, k).double() @ qweight.cpu().double().T) * q_scale.cpu().reshape(-1, 1).double()
    y = y * wscale.cpu().double()
    if bias is not None:
        y = y + bias.cpu().double()
    return y.reshape(*q.shape[:-1], -1)


def outlier_layer(n: int = 128, k: int = 512, t: int = 1024, seed: int = 0, outliers: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic linear layer and its calibration inputs, shaped like an LLM's.

    Returns:
        w (n, k): Laplace weights with per-input-channel magnitudes; x (t, k): correlated features (z @ A), with 8
        outlier channels scaled 10x to 50x if `outliers`.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))
    idx = torch.randperm(k, generator=g)[:8]
    if outliers:
        x[:, idx] *= torch.linspace(10, 50, 8)
    sign = torch.randint(0, 2, (n, k), generator=g) * 2 - 1
    w = sign * -torch.log(torch.rand(n, k, generator=g)) * (0.5 + torch.rand(1, k, generator=g)) * 0.02
    return w, x


def fake_quantize_linears(model: torch.nn.Module, scheme: str, group_size: int = 32, skip=("lm_head",)
                          ) -> torch.nn.Module:
    """The eager oracle of weight-only quantization: every `nn.Linear` whose name contains none of `skip` gets its
    weight replaced, in place, by its quantized-then-dequantized value (`scheme` w8a16: int8 per channel; w4a16:
    int4 round to nearest in groups of `group_size`)."""
    from llmcompress.formats import quantized as formats

    if scheme not in ("w8a16", "w4a16"):
        raise ValueError(f"fake_quantize_linears: scheme must be w8a16 or w4a16, got {scheme!r}")
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(s in name for s in skip):
            w = mod.weight.data
            if scheme == "w8a16":
                deq = formats.dequantize_int8(*formats.quantize_int8_per_channel(w))
            else:
                deq = formats.dequantize_int4(*formats.quantize_int4_rtn(w, group_size), group_size)
            mod.weight.data = deq.to(w.dtype)
    return model



def random_2of4_mask(n: int, k: int, seed: int = 0, keep_fewer: bool = False) -> torch.Tensor:
    """(n, k) bool keeping exactly two random positions of every group of 4 consecutive k (k % 4 == 0); with
    `keep_fewer`, about a quarter of the groups keep one or none, as a pruned weight's exact zeros would."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(n, k // 4, 4, generator=g).argsort(dim=-1)
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    if keep_fewer:
        drop = torch.rand(n, k // 4, 2, generator=g) < 0.15
        mask.scatter_(-1, order[..., :2], ~drop)
    return mask.reshape(n, k)


GEMV_TEST_TOKENS = 9
"""The most tokens the MoE kernel tests give the gemv path (decode's: one program per routed slot). Under the Triton
interpreter 21 tokens cost 5-15 s a case and reach no branch that 9 (several slots per expert) do not."""


def path_tokens(t: int, path: str) -> int:
    """A case's token count for the MoE kernels' `path` ("gemv" or "gemm")."""
    return min(t, GEMV_TEST_TOKENS) if path == "gemv" else t


def uneven_router_logits(t: int, e: int, seed: int = 0) -> torch.Tensor:
    """(t, e) router logits that load experts unevenly, as a real router does: most tokens pulled to expert 1, expert
    0 never chosen (MoE kernels must handle an empty expert and one holding most of the batch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, e, generator=g)
    x[:, 0] = -10.0
    x[: (3 * t) // 4, 1] += 3.0
    return x
