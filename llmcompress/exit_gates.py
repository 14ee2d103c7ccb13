"""Confidence gates for an early-exit cascade (issue 16) and the choice of exits. Entry point: `calibrate_cascade`.

A gate at exit E is a logistic regression predicting "the exit's top-1 equals the full model's top-1" from the
layer-E state (RMS-normalised), its log RMS, the size of layer E's update and its cosine with layer E's input, and
for `features="logits"` also the exit head's max probability, top-1/top-2 margin and entropy. It is fitted (LBFGS,
float64, L2) on teacher-forced full-model states of the first ¾ of the calibration rows; the thresholds are set on
the held-back ¼ so that the cascade's top-1 agreement there stays ≥ `min_agreement` with a one-sided 90 % bound
(the allowed errors are shrunk by 1.28 binomial standard deviations, so the budget holds on text the thresholds did
not see). The cost model (`CostModel.kernel_time`, M = 1 decode) prices every kept exit: a gate evaluated on each
token that reaches it (a logits gate runs the exit's norm + LM head: on tiny-llama, vocab 4096 × 384, that is ≈ one
decoder layer), and per exiting token the translation and the K/V projections that fill the skipped layers' cache.
Exits are dropped greedily while that lowers the predicted time per token; the plan is declined, with the reason,
when no set of exits is predicted faster than the full model.

Model-level (drives HF modules through `exit_heads`); `cascade.py` runs the plan in HF `generate`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy
import torch

from llmcompress.cost.decode_step import weights_time
from llmcompress.cost.hardware import resolve
from llmcompress.cost.roofline import CostModel
from llmcompress.errors import OptionError
from llmcompress.exit_heads import (
    DISTILL_STEPS,
    DecoderParts,
    ExitHead,
    calibrated_heads,
    check_exit_layer,
    check_ids,
    decoder_parts,
    fit_heads_from_states,
    layer_states,
)

GATE_FEATURES = ("auto", "hidden", "logits")
BUDGET_Z = 1.28
"""One-sided 90 % normal bound on the held-back error count: with 6 × 512 held-back tokens at 0.99 it allows 23.6
errors instead of 30.7, so a threshold that just meets the budget there still meets it on new text."""
THRESHOLD_CANDIDATES = 96
"""Quantiles of a gate's held-back scores tried as its threshold (plus "never"): finer changed skip by < 0.2 points."""


TEMPERATURES = torch.logspace(math.log10(0.5), math.log10(4.0), 31, dtype=torch.float64).tolist()
"""Exit temperatures tried (`fit_temperature`): 0.5 … 4, 7 % apart."""


def check_max_perplexity_increase(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0.0:
        raise OptionError(f"max_perplexity_increase: {value!r}; expected a share > 0 (0.02: at most +2 % perplexity "
                          "against the full model) or None (no bound)")
    return float(value)


def check_min_agreement(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise OptionError(f"min_agreement: {value!r} is outside (0, 1]; expected the share of tokens whose top-1 "
                          "must equal the full model's, e.g. 0.99")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Gate:
    """The gate at exit `layer`: sigmoid(standardised features · weight + bias) ≥ threshold means exit.

    weight, mean, std: (F,) float32; logits: whether the features include the exit head's probabilities."""

    layer: int
    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    std: torch.Tensor
    logits: bool
    threshold: float = math.inf
    hidden_weight: torch.Tensor | None = None
    hidden_bias: torch.Tensor | None = None

    def score(self, before: torch.Tensor, after: torch.Tensor, exit_logits: torch.Tensor | None = None) -> torch.Tensor:
        """before, after: (..., hidden) layer E's input and output; exit_logits: (..., vocab) when `logits` →
        (...) probability that the exit agrees with the full model."""
        x = (gate_features(before, after, exit_logits if self.logits else None) - self.mean) / self.std
        if self.hidden_weight is not None:
            x = torch.nn.functional.gelu(x @ self.hidden_weight + self.hidden_bias)
        return torch.sigmoid(x @ self.weight + self.bias)

    def with_threshold(self, threshold: float) -> Gate:
        return dataclasses.replace(self, threshold=float(threshold))


def gate_features(before: torch.Tensor, after: torch.Tensor, exit_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(..., hidden) × 2 [+ (..., vocab)] → (..., F) float32 features: the layer's log RMS, its update's log RMS and
    cosine with its input, then either the RMS-normalised state (F = hidden + 3) or, given the exit's logits, their
    top-5 log-probabilities and probabilities, top-1/top-2 margin and entropy (F = 15). The state is left out of the
    logits features: with it the gates kept 0.993 agreement on held-back train.txt but 0.974 on validation.txt
    (tiny-llama, 0.99 budget); without, 0.993 on validation.txt."""
    before, after = before.float(), after.float()
    rms = after.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    update = (after - before).pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    cos = torch.nn.functional.cosine_similarity(after, before, dim=-1, eps=1e-6).unsqueeze(-1)
    feats = [rms.log(), update.log(), cos]
    if exit_logits is None:
        return torch.cat([after / rms, *feats], -1)
    logp = torch.log_softmax(exit_logits.float(), -1)
    top = logp.topk(5, dim=-1).values
    entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
    return torch.cat([*feats, top, top.exp(), top[..., :1].exp() - top[..., 1:2].exp(), entropy], -1)


def fit_gate(layer: int, features: torch.Tensor, labels: torch.Tensor, *, logits: bool, hidden_units: int = 0,
             l2: float = 1e-2, steps: int = 100, seed: int = 0) -> Gate:
    """Logistic regression (hidden_units = 0) or a one-hidden-layer GELU MLP of labels (n,) bool on features (n, F),
    fitted by float64 LBFGS with L2 on the weights (per token)."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = labels.double()
    gen = torch.Generator().manual_seed(seed)
    width = hidden_units or x.shape[1]
    w1 = (torch.randn(x.shape[1], hidden_units, generator=gen, dtype=torch.float64) / math.sqrt(x.shape[1])
          if hidden_units else None)
    b1 = torch.zeros(hidden_units, dtype=torch.float64) if hidden_units else None
    w = torch.zeros(width, dtype=torch.float64)
    b = torch.zeros((), dtype=torch.float64)
    params = [t.requires_grad_() for t in (w, b, w1, b1) if t is not None]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        h = x if w1 is None else torch.nn.functional.gelu(x @ w1 + b1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(h @ w + b, y) + l2 * w.pow(2).sum() / 2
        if w1 is not None:
            loss = loss + l2 * w1.pow(2).sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Gate(layer, w.detach().float(), float(b.detach()), mean.float(), std.float(), logits,
                hidden_weight=None if w1 is None else w1.detach().float(),
                hidden_bias=None if b1 is None else b1.detach().float())


@dataclasses.dataclass(frozen=True)
class CascadeCosts:
    """Predicted seconds per token at decode (M = 1): one decoder layer (mean), the final norm + LM head, a
    translation A_E h + b_E, the K/V fill of one skipped layer (input norm + k_proj + v_proj), a hidden gate and a
    logits gate (hidden gate + the exit's norm + LM head)."""

    layer: float
    head: float
    translation: float
    fill: float
    gate_hidden: float
    gate_logits: float
    num_layers: int

    def gate(self, logits: bool) -> float:
        return self.gate_logits if logits else self.gate_hidden

    @property
    def full(self) -> float:
        return self.num_layers * self.layer + self.head


def cascade_costs(model: torch.nn.Module, hardware: str = "auto") -> CascadeCosts:
    parts = decoder_parts(model)
    weight = parts.lm_head.weight
    dtype = weight.dtype
    cost = CostModel(resolve(hardware, weight.device))
    leaves = [[m for m in layer.modules() if next(m.parameters(recurse=False), None) is not None]
              for layer in parts.layers]
    layer = sum(weights_time(cost, ms, dtype) for ms in leaves) / len(leaves)
    head = weights_time(cost, [parts.norm, parts.lm_head], dtype)
    fill = sum(weights_time(cost, [lay.input_layernorm, lay.self_attn.k_proj, lay.self_attn.v_proj], dtype)
               for lay in parts.layers) / len(parts.layers)
    return priced_cascade(cost, weight, layer=layer, head=head, fill=fill, num_layers=parts.num_layers)


def priced_cascade(cost: CostModel, lm_head_weight: torch.Tensor, *, layer: float, head: float, fill: float,
                   num_layers: int) -> CascadeCosts:
    """The cascade's prices from the measured-by-weights parts (a layer, the final norm + LM head, one K/V fill):
    the translation and gate terms priced in one place, for HF modules (`cascade_costs`) and for a graph's weights
    (the `early-exit` pass). lm_head_weight: (vocab, hidden), a real or fake tensor (its shape and dtype)."""
    dtype, (vocab, hidden) = lm_head_weight.dtype, lm_head_weight.shape
    translation = cost.kernel_time(2 * hidden * hidden, hidden * (hidden + 1) * lm_head_weight.element_size(), dtype,
                                   rows=1)
    # features: ~6 elementwise passes over the state + one dot product of hidden + 3 weights
    gate_hidden = cost.kernel_time(14 * hidden, 8 * hidden, torch.float32, launches=6)
    # the logits gate also translates, normalises and runs the LM head, then softmax / top-2 / entropy over the vocab
    gate_logits = gate_hidden + translation + head + cost.kernel_time(6 * vocab, 8 * vocab, torch.float32, launches=4)
    return CascadeCosts(layer, head, translation, fill, gate_hidden, gate_logits, num_layers)


@dataclasses.dataclass(frozen=True)
class CascadePlan:
    """What `calibrate_cascade` measured and chose.

    heads, gates: the kept exits (gates carry their thresholds); features: "hidden" or "logits".
    held_back: teacher-forced on the held-back rows: agreement, skip_fraction (share of decoder-layer evaluations
    skipped), exit_share {E: share of tokens exiting at E}; predicted: seconds per token (cascade, full) and speedup.
    dropped: {E: reason}; declined: why nothing is kept (None when the cascade runs); fill_maps: {(E, l): map of the
    exit-E state to skipped layer l's input} (`fit_fill_maps`), empty when not fitted."""

    heads: dict[int, ExitHead]
    gates: dict[int, Gate]
    min_agreement: float
    features: str
    held_back: dict[str, object]
    predicted: dict[str, float]
    dropped: dict[int, str]
    declined: str | None
    fill_maps: dict[tuple[int, int], ExitHead] = dataclasses.field(default_factory=dict)
    costs: CascadeCosts | None = None
    """The prices the exits and thresholds were chosen with (`cascade.calibrate_on_cascade` re-chooses with them)."""
    temperatures: dict[int, float] = dataclasses.field(default_factory=dict)
    """{E: T}: an exiting token's logits are the exit head's divided by T (`fit_temperature`); 1 when absent."""
    max_perplexity_increase: float | None = None
    """The perplexity budget the thresholds were set to (None: top-1 agreement only)."""

    @property
    def exits(self) -> list[int]:
        return sorted(self.gates)

    def fill_state(self, exit_layer: int, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The input of skipped decoder layer `layer` (0-based, ≥ exit_layer) estimated from exit `exit_layer`'s
        state: its skipped key/value slot is projected from this. A fitted map where calibration fitted one
        (fill_maps[(exit_layer, layer)]), else the exit state itself (state propagation, as in CALM)."""
        fitted = self.fill_maps.get((exit_layer, layer))
        return hidden if fitted is None else fitted.translate(hidden)

    def output_logits(self, exit_layer: int, logits: torch.Tensor) -> torch.Tensor:
        """The logits an exiting token returns: the exit head's, divided by the exit's fitted temperature."""
        t = self.temperatures.get(exit_layer, 1.0)
        return logits if t == 1.0 else logits / t


@dataclasses.dataclass
class GateScores:
    """Held-back, per candidate exit E: gate score (n,), whether the exit agrees with the full model (n,) and, for a
    perplexity budget, the KL an exit there costs (n,).

    drift_per_fill: errors expected among the tokens that follow per approximate K/V fill (a skipped layer after the
    first: the first one's input is the exit state itself), as measured on the running cascade; 0 teacher-forced."""

    score: dict[int, torch.Tensor]
    agree: dict[int, torch.Tensor]
    drift_per_fill: float = 0.0
    kl: dict[int, torch.Tensor] | None = None
    """Per candidate exit, KL(full model ‖ the exit's tempered output) (n,) in nats: what an exiting token adds to
    the expected negative log-likelihood (None: no perplexity budget)."""
    drift_kl_per_fill: float = 0.0
    """Like drift_per_fill, for the KL of the tokens that follow."""


def simulate_cascade(exits: list[int], thresholds: dict[int, float], s: GateScores, costs: CascadeCosts, logits: bool):
    """Teacher-forced cascade on held-back tokens → (errors, mean seconds per token, exit layer per token (0: none)).
    errors: the exits' own wrong answers plus `s.drift_per_fill` per approximate K/V fill."""
    return _Simulator(s, costs, logits)(exits, thresholds)


class _Simulator:
    """`simulate_cascade` on numpy copies of the scores, made once per `fit_thresholds`: the threshold search runs the
    cascade ~10⁴ times on a few thousand tokens, where torch's per-op overhead was 40 % of the smoke runs of
    benchmarks/early_exit_gates.py (30 s of 80). A token's seconds are its gates' then its exit's (or the full
    model's) prices, added in the order the cascade meets them, in float64 from float32-rounded prices; the mean is
    torch's, so the times, and the thresholds chosen by comparing them, are those of the torch arithmetic before."""

    def __init__(self, s: GateScores, costs: CascadeCosts, logits: bool):
        self.score = {e: v.numpy(force=True) for e, v in s.score.items()}
        self.agree = {e: v.numpy(force=True).astype(bool) for e, v in s.agree.items()}
        self.n = next(iter(self.score.values())).shape[0]
        self.drift = s.drift_per_fill
        self.costs, self.logits = costs, logits

    def __call__(self, exits: list[int], thresholds: dict[int, float]):
        costs, n = self.costs, self.n
        # a logits gate already computed the exit's logits; a hidden gate translates and runs the head now
        exit_head = 0.0 if self.logits else costs.translation + costs.head
        gate = float(numpy.float32(costs.gate(self.logits)))
        exit_at = numpy.zeros(n, dtype=numpy.int64)
        position = numpy.full(n, len(exits), dtype=numpy.int64)  # index into `seconds` (len(exits): no exit)
        wrong = numpy.zeros(n, dtype=bool)
        alive = numpy.ones(n, dtype=bool)
        seconds, spent = [], 0.0
        for k, e in enumerate(exits):
            spent += gate
            go = alive & (self.score[e] >= thresholds[e])
            exit_at[go] = e
            position[go] = k
            wrong |= go & ~self.agree[e]
            seconds.append(spent + float(numpy.float32(e * costs.layer + (costs.num_layers - e) * costs.fill
                                                       + exit_head)))
            alive &= ~go
        seconds.append(spent + float(numpy.float32(costs.full)))
        time = torch.from_numpy(numpy.asarray(seconds, dtype=numpy.float64)[position]).mean().item()
        errors = int(wrong.sum())
        if self.drift:
            errors += self.drift * int(numpy.where(exit_at > 0, costs.num_layers - exit_at - 1, 0).sum())
        return errors, time, torch.from_numpy(exit_at)


def nll_contributions(s: GateScores, exit_at: torch.Tensor, num_layers: int) -> torch.Tensor:
    """(n,) float64: the negative log-likelihood each held-back token adds in expectation (nats) under the exits
    taken (exit_at from `simulate_cascade`): an exiting token's KL plus `s.drift_kl_per_fill` per approximate fill;
    0 for a token that runs every layer."""
    out = torch.zeros(exit_at.numel(), dtype=torch.float64)
    if s.kl is None:
        return out
    flat = exit_at.flatten()
    for e, kl in s.kl.items():
        sel = flat == e
        out[sel] = kl.flatten()[sel].double()
    fills = torch.where(flat > 0, num_layers - flat - 1, 0).double()
    return out + s.drift_kl_per_fill * fills


def nll_bound(contributions: torch.Tensor, z: float = BUDGET_Z) -> float:
    """One-sided 90 % upper bound of the summed added NLL on text like the held-back tokens (their sum plus
    z, by default `BUDGET_Z`, standard deviations of a sum of that many tokens), as `allowed_errors` shrinks the
    error budget: on tiny-llama thresholds held to the plain sum at +2 % on held-back train.txt gave +2.3 % on
    validation.txt. z = 0: the plain sum."""
    c = contributions.double().flatten()
    if c.numel() < 2 or z == 0:
        return float(c.sum())
    return float(c.sum()) + z * math.sqrt(float((c - c.mean()).pow(2).sum()))


def allowed_nll(tokens: int, max_perplexity_increase: float | None) -> float:
    """Nats the cascade may add over `tokens` tokens: perplexity is exp(mean NLL), so +p % is log(1 + p) each."""
    return math.inf if max_perplexity_increase is None else tokens * math.log1p(max_perplexity_increase)


def fit_thresholds(exits: list[int], s: GateScores, costs: CascadeCosts, logits: bool, allowed: float,
                   allowed_kl: float = math.inf, budget_z: float = BUDGET_Z):
    """Thresholds for the least predicted time with at most `allowed` held-back errors.

    First a Lagrangian sweep: exit E opens when the gate's P(agree) ≥ 1 − saving_E / λ + drift_E (an error is worth
    λ seconds; saving_E: the layers skipped minus their K/V fill and the exit's head; drift_E: the errors its
    approximate fills cause later, `GateScores.drift_per_fill`), the λ with the least time that meets the
    budget; then coordinate descent over each threshold (quantiles of its scores). Descent alone, from every gate
    closed, let the first exit take the whole error budget: 7 % of layer evaluations skipped on tiny-llama at 0.99
    where the sweep + descent finds more. The added NLL is held at `nll_bound(..., budget_z)`."""
    def within(errors: float, exit_at: torch.Tensor) -> bool:
        if errors > allowed:
            return False
        added = None if allowed_kl == math.inf else nll_contributions(s, exit_at, costs.num_layers)
        return added is None or nll_bound(added, budget_z) <= allowed_kl

    simulate = _Simulator(s, costs, logits)
    closed = {e: math.inf for e in exits}
    thresholds, best = closed, simulate(exits, closed)[1]
    head = 0.0 if logits else costs.translation
    saving = {e: (costs.num_layers - e) * (costs.layer - costs.fill) - head + (costs.head if logits else 0.0)
              for e in exits}
    for lam in torch.logspace(-6, 2, 200).tolist():
        trial = {e: (1 - saving[e] / lam + s.drift_per_fill * (costs.num_layers - e - 1)) if saving[e] > 0
                 else math.inf for e in exits}
        errors, time, exit_at = simulate(exits, trial)
        if time < best - 1e-15 and within(errors, exit_at):
            thresholds, best = trial, time
    q = torch.linspace(0, 1, THRESHOLD_CANDIDATES, dtype=torch.float64)
    for _ in range(3):
        changed = False
        for e in exits:
            for t in [math.inf, *torch.quantile(s.score[e].double(), q).tolist()]:
                trial = {**thresholds, e: t}
                errors, time, exit_at = simulate(exits, trial)
                if time < best - 1e-15 and within(errors, exit_at):
                    thresholds, best, changed = trial, time, True
        if not changed:
            break
    return thresholds, best


def choose_exits(candidates: list[int], s: GateScores, costs: CascadeCosts, logits: bool, allowed: float,
                 min_agreement: float, allowed_kl: float = math.inf, budget_z: float = BUDGET_Z
                 ) -> tuple[list[int], dict[int, float], float, dict[int, str]]:
    """The exits the cost model keeps: thresholds for all candidates, then the exit whose removal lowers the
    predicted time most is dropped, while one does; exits left with no threshold that saves time are dropped too.
    Returns (exits, thresholds, predicted seconds per token, {dropped exit: reason}). budget_z: as `fit_thresholds`
    holds the added NLL (0: the plain sum, for thresholds set on the very tokens they are judged on)."""
    exits, dropped = list(candidates), {}
    thresholds, time = fit_thresholds(exits, s, costs, logits, allowed, allowed_kl, budget_z)
    while len(exits) > 1:
        trials = {e: fit_thresholds([x for x in exits if x != e], s, costs, logits, allowed, allowed_kl, budget_z)
                  for e in exits}
        e, (t_without, time_without) = min(trials.items(), key=lambda kv: kv[1][1])
        if time_without >= time:
            break
        dropped[e] = (f"exit {e} dropped: the cascade is predicted {time * 1e6:.2f} µs/token with it, "
                      f"{time_without * 1e6:.2f} without (its gate and head cost more than it saves)")
        exits.remove(e)
        thresholds, time = t_without, time_without
    for e in list(exits):
        if thresholds[e] == math.inf:
            dropped[e] = (f"exit {e} dropped: no threshold keeps the agreement ≥ {min_agreement}"
                          f"{'' if allowed_kl == math.inf else ' and the perplexity budget'} and saves time")
            exits.remove(e)
    return exits, {e: thresholds[e] for e in exits}, time, dropped


@torch.no_grad()
def calibrate_cascade(model: torch.nn.Module, calibration: torch.Tensor, *, min_agreement: float,
                      exit_layers: Sequence[int] | str = "auto", features: str = "auto", hidden_units: int = 32,
                      hardware: str = "auto", costs: CascadeCosts | None = None,
                      fill_maps: bool = True, max_perplexity_increase: float | None = None, head: str = "fitted",
                      distill_steps: int = DISTILL_STEPS) -> CascadePlan:
    """Fit exit heads and gates on the first ¾ of calibration (n, seq) token ids, set thresholds on the held-back ¼
    (n ≥ 2), and keep the exits the cost model says pay. exit_layers: candidates (default every 1 … L−1);
    features: "hidden", "logits" or "auto" (the one predicted faster); hidden_units: the gate MLP's width (0: logistic
    regression; 32 let 10.5 % of tokens exit at tiny-llama's exit 3 at 0.99 against 7.4 % for logistic); costs: the
    prices to optimise (default `cascade_costs(model, hardware)`; a benchmark passes layer counts to maximise skips);
    fill_maps: fit `fit_fill_maps` for the kept exits (False: the skipped layers' K/V from the exit state itself);
    max_perplexity_increase: also keep the held-back expected perplexity within 1 + this (0.02: +2 %; None: no bound);
    head: "fitted" (ridge least squares) or "distilled" (refined on the full model's distribution for
    `distill_steps`, `exit_heads.distill_heads`).
    Thresholds set here hold teacher-forced; `cascade.calibrate_on_cascade` re-sets them on the running cascade."""
    parts = decoder_parts(model)
    min_agreement = check_min_agreement(min_agreement)
    calibration = check_ids(calibration, "calibration")
    if features not in GATE_FEATURES:
        raise OptionError(f"features: {features!r}; expected one of {', '.join(GATE_FEATURES)}")
    if calibration.shape[0] < 2:
        raise OptionError(f"calibration: {calibration.shape[0]} sequence(s); the cascade needs ≥ 2 (gates are fitted "
                          "on some and their thresholds set on the others)")
    candidates = list(range(1, parts.num_layers)) if exit_layers == "auto" else list(exit_layers)
    if not candidates:
        raise OptionError("exit_layers: empty; expected 'auto' or a list of decoder layers in "
                          f"[1, {parts.num_layers - 1}]")
    for e in candidates:
        check_exit_layer(e, parts.num_layers)
    candidates = sorted(set(candidates))
    device = parts.lm_head.weight.device
    fit_ids, held_ids = (ids.to(device) for ids in split_calibration(calibration))
    costs = cascade_costs(model, hardware) if costs is None else costs
    return calibrate_from_states(parts, layer_states(model, fit_ids), layer_states(model, held_ids),
                                 min_agreement=min_agreement, candidates=candidates, features=features,
                                 hidden_units=hidden_units, costs=costs, fill_maps=fill_maps,
                                 max_perplexity_increase=max_perplexity_increase, head=head,
                                 distill_steps=distill_steps)


@torch.no_grad()
def calibrate_from_states(parts: DecoderParts, fit_states: Sequence[torch.Tensor],
                          held_states: Sequence[torch.Tensor], *, min_agreement: float, candidates: Sequence[int],
                          features: str, hidden_units: int, costs: CascadeCosts, fill_maps: bool = True,
                          ridge: float = 1e-2, max_perplexity_increase: float | None = None, head: str = "fitted",
                          distill_steps: int = DISTILL_STEPS) -> CascadePlan:
    """`calibrate_cascade` on layer states already captured (`layer_states`' layout) for the fit rows and the
    held-back rows; parts needs only norm, lm_head and the layer count. The FX pass feeds it the graph's
    layer-boundary values. With fill_maps each skipped layer's K/V fill also pays a map (priced as a translation).
    Each exit's temperature is fitted on the fit rows (`fit_temperature`); with max_perplexity_increase the held-back
    KL of the tokens that exit is held within the budget (`nll_contributions`, `nll_bound`) as the errors are."""
    min_agreement = check_min_agreement(min_agreement)
    max_perplexity_increase = check_max_perplexity_increase(max_perplexity_increase)
    if features not in GATE_FEATURES:
        raise OptionError(f"features: {features!r}; expected one of {', '.join(GATE_FEATURES)}")
    heads = calibrated_heads(parts, fit_states, candidates, head, steps=distill_steps)
    kinds = ["hidden", "logits"] if features == "auto" else [features]
    scores = {k: GateScores({}, {}) for k in kinds}
    gates: dict[str, dict[int, Gate]] = {k: {} for k in kinds}
    fit_full = _top1(parts, fit_states[-1])
    held_full = _top1(parts, held_states[-1])
    held_full_logp = (None if max_perplexity_increase is None else
                      torch.cat([torch.log_softmax(parts.lm_head(parts.norm(c)).float(), -1)
                                 for c in held_states[-1].split(4)]))
    temperatures = {}
    held_kl: dict[int, torch.Tensor] | None = None if held_full_logp is None else {}  # shared by the gate kinds
    for e in candidates:
        fit_logits = _chunked_logits(parts, heads[e], fit_states[e])
        held_logits = _chunked_logits(parts, heads[e], held_states[e])
        fit_agree = (fit_logits.argmax(-1) == fit_full).flatten()
        held_agree = (held_logits.argmax(-1) == held_full).flatten()
        temperatures[e] = fit_temperature(parts, fit_logits, fit_states[-1], fit_agree)
        for k in kinds:
            use = k == "logits"
            x = gate_features(fit_states[e - 1], fit_states[e], fit_logits if use else None)
            gates[k][e] = gate = fit_gate(e, x.flatten(0, -2), fit_agree, logits=use, hidden_units=hidden_units)
            scores[k].score[e] = gate.score(held_states[e - 1], held_states[e], held_logits if use else None).flatten()
            scores[k].agree[e] = held_agree
            scores[k].kl = held_kl
        if held_kl is not None:
            held_kl[e] = kl_to_full(held_full_logp, held_logits / temperatures[e]).flatten()
        del fit_logits, held_logits
    del held_full_logp
    n = held_full.numel()
    allowed = allowed_errors(n, min_agreement)
    allowed_kl = allowed_nll(n, max_perplexity_increase)
    if fill_maps:
        costs = dataclasses.replace(costs, fill=costs.fill + costs.translation)

    best = None
    for k in kinds:
        exits, thresholds, time, dropped = choose_exits(candidates, scores[k], costs, k == "logits", allowed,
                                                        min_agreement, allowed_kl)
        if best is None or time < best[1]:
            best = (k, time, exits, thresholds, dropped)
    kind, time, exits, thresholds, dropped = best
    errors, _, exit_at = simulate_cascade(exits, thresholds, scores[kind], costs, kind == "logits")
    skipped = torch.where(exit_at > 0, parts.num_layers - exit_at, 0).double().sum().item()
    held_back = {"tokens": n, "head": head, "allowed_errors": allowed, "agreement": 1 - errors / n,
                 "skip_fraction": skipped / (n * parts.num_layers), "temperatures": temperatures,
                 "exit_share": {e: (exit_at == e).double().mean().item() for e in exits}}
    predicted = {"cascade_s": time, "full_s": costs.full, "speedup": costs.full / time}
    declined = None
    if not exits or time >= costs.full:
        declined = (f"declined: no exit is predicted to pay at min_agreement {min_agreement} (held-back error "
                    f"budget {max(allowed, 0):.1f} of {n} tokens; gates '{kind}'; best {time * 1e6:.2f} µs/token "
                    f"with exits {exits or 'none'} vs {costs.full * 1e6:.2f} for the full model; "
                    f"{'; '.join(dropped.values()) or 'no exit'})")
        exits = []
    maps = fit_fill_maps(fit_states, exits, ridge=ridge, dtype=parts.lm_head.weight.dtype) if fill_maps else {}
    if maps:
        held_back["fill_error"] = fill_errors(held_states, maps)
    if max_perplexity_increase is not None:
        added = nll_contributions(scores[kind], exit_at, parts.num_layers)
        held_back.update({"allowed_nll": allowed_kl, "perplexity_increase": math.expm1(float(added.sum()) / n),
                          "perplexity_increase_bound": math.expm1(nll_bound(added) / n)})
    return CascadePlan({e: heads[e] for e in exits},
                       {e: gates[kind][e].with_threshold(thresholds[e]) for e in exits}, min_agreement, kind,
                       held_back, predicted, dropped, declined, maps, costs,
                       {e: temperatures[e] for e in exits}, max_perplexity_increase)


def kl_to_full(full_logp: torch.Tensor, logits: torch.Tensor, full_p: torch.Tensor | None = None) -> torch.Tensor:
    """(..., vocab) log-probabilities of the full model and logits of an exit → (...) KL(full ‖ exit) in nats: the
    negative log-likelihood the exit adds in expectation over the full model's next tokens. full_p: full_logp.exp(),
    for a caller that compares many exits' logits with the same full model (the same numbers, one exp fewer)."""
    logq = torch.log_softmax(logits.float(), -1)
    return ((full_logp.exp() if full_p is None else full_p) * (full_logp - logq)).sum(-1).clamp_min(0.0)


@torch.no_grad()
def fit_temperature(parts: DecoderParts, exit_logits: torch.Tensor, last_states: torch.Tensor,
                    agree: torch.Tensor, *, sample: int = 8192, seed: int = 0) -> float:
    """The T in `TEMPERATURES` that minimises the mean KL(full ‖ softmax(exit logits / T)) over (a seeded sample of
    up to `sample`) tokens whose exit agrees with the full model: the ones a gate lets exit. On tiny-llama (48 × 512
    train tokens) it fitted 1.15 at exit 1 and 1.0 at exits 3-5: the least-squares heads of the later exits are about
    as confident as the full model on the tokens they get right. exit_logits: (..., vocab); last_states: (..., hidden)
    the last layer's output on the same tokens; agree: (n,) bool."""
    idx = agree.nonzero().flatten()
    if idx.numel() == 0:
        return 1.0
    if idx.numel() > sample:
        idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))[:sample]]
    z = exit_logits.reshape(-1, exit_logits.shape[-1])[idx].float()
    full_logp = torch.log_softmax(parts.lm_head(parts.norm(last_states.reshape(-1, last_states.shape[-1])[idx]))
                                  .float(), -1)
    full_p = full_logp.exp()
    # The mean KL is convex in 1/T; its slope in T, mean(E_full[z] - E_T[z]), rises with T. A bisection for the
    # first temperature where the slope is ≥ 0 brackets the minimum; the KL itself then decides among that
    # temperature and its neighbours: 8 passes over (tokens, vocab) instead of 31, the same choice as trying all.
    full_z = (full_p * z).sum(-1)
    lo, hi = 0, len(TEMPERATURES)
    while lo < hi:
        mid = (lo + hi) // 2
        slope = (full_z - (torch.softmax(z / TEMPERATURES[mid], -1) * z).sum(-1)).mean().item()
        lo, hi = (lo, mid) if slope >= 0 else (mid + 1, hi)
    near = range(max(lo - 1, 0), min(lo + 2, len(TEMPERATURES)))
    kl = {i: kl_to_full(full_logp, z / TEMPERATURES[i], full_p).mean().item() for i in near}
    return TEMPERATURES[min(near, key=kl.__getitem__)]


def allowed_errors(tokens: int, min_agreement: float) -> float:
    """Errors allowed on `tokens` held-back tokens at `min_agreement`, shrunk by `BUDGET_Z` standard deviations."""
    return (1 - min_agreement) * tokens - BUDGET_Z * math.sqrt(max(min_agreement * (1 - min_agreement), 0.0) * tokens)


def split_calibration(calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, seq) calibration ids → (fit rows, held-back rows): the last ¼ (at least 1) is held back."""
    held = max(1, calibration.shape[0] // 4)
    return calibration[:-held], calibration[-held:]


def fit_fill_maps(states: Sequence[torch.Tensor], exits: Iterable[int], *, ridge: float = 1e-2,
                  dtype: torch.dtype | None = None) -> dict[tuple[int, int], ExitHead]:
    """Per exit E and skipped layer l > E, a ridge map of the layer-E state to layer l's input (states[l] in
    `layer_states`' layout), fitted like the exit heads (`fit_heads_from_states` with states[l] as the target).
    Layer E's own input is the exit state, so it needs none. On tiny-llama (maps fitted on 24 × 512 train tokens,
    every exit 1-5 kept at 0.99) the max-skip cascade's validation agreement rose from 0.949 to 0.957 with them."""
    maps = {}
    for e in exits:
        for layer in range(e + 1, len(states) - 1):
            maps[(e, layer)] = fit_heads_from_states(states[: layer + 1], [e], ridge=ridge, dtype=dtype)[e]
    return maps


def fill_errors(states: Sequence[torch.Tensor], maps: dict[tuple[int, int], ExitHead]) -> dict[int, dict[int, dict]]:
    """Relative squared error ‖estimate − states[l]‖² / ‖states[l]‖² of each skipped layer's input on `states` (the
    held-back rows): {E: {l: {"exit": the exit state as the estimate, "map": the fitted map's}}}."""
    out: dict[int, dict[int, dict]] = {}
    for (e, layer), fill in sorted(maps.items()):
        target = states[layer].double()
        norm = target.pow(2).sum().item()
        out.setdefault(e, {})[layer] = {
            "exit": (states[e].double() - target).pow(2).sum().item() / norm,
            "map": (fill.translate(states[e]).double() - target).pow(2).sum().item() / norm}
    return out


def _top1(parts: DecoderParts, last: torch.Tensor) -> torch.Tensor:
    return torch.cat([parts.lm_head(parts.norm(c)).argmax(-1) for c in last.split(4)])


def _chunked_logits(parts: DecoderParts, head: ExitHead, states: torch.Tensor) -> torch.Tensor:
    return torch.cat([head.logits(parts, c).float() for c in states.split(4)])


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, plan: CascadePlan, ids: torch.Tensor) -> dict[str, object]:
    """The plan's gates on the full model's states of ids (n, seq), as calibration sees them (no cache effects):
    top-1 agreement with the full model, share of decoder-layer evaluations skipped, tokens exiting per exit, and
    exit_at (n, seq): the exit each token takes (0: none)."""
    parts = decoder_parts(model)
    ids = check_ids(ids, "ids").to(parts.lm_head.weight.device)
    states = layer_states(model, ids)
    full = _top1(parts, states[-1])
    exit_at = torch.zeros_like(full)
    wrong = torch.zeros_like(full, dtype=torch.bool)
    for e in plan.exits:
        gate = plan.gates[e]
        logits = _chunked_logits(parts, plan.heads[e], states[e])
        go = (exit_at == 0) & (gate.score(states[e - 1], states[e], logits if gate.logits else None)
                               >= gate.threshold)
        exit_at[go] = e
        wrong |= go & (logits.argmax(-1) != full)
    skipped = torch.where(exit_at > 0, parts.num_layers - exit_at, 0).double().sum().item()
    return {"agreement": 1 - wrong.double().mean().item(), "skip_fraction": skipped / (full.numel() * parts.num_layers),
            "exits": {e: int((exit_at == e).sum()) for e in plan.exits}, "exit_at": exit_at}
