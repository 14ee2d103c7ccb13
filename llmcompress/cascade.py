"""Early-exit cascade at model level (issue 16): a calibrated `CascadePlan` (`exit_gates.calibrate_cascade`) run
inside HF `generate` with any cache (dynamic or static). Entry points: `cascade_generate`, `cascade`, `evaluate`.

`cascade(model, plan)` swaps the decoder layers for wrappers while it is open. At a decode step (one new token per
row) the wrapper of a kept exit E scores its gate; when every row of the batch is confident the remaining layers do
not run: each fills its key/value slot for the token by projecting the exit's hidden state through its own input
norm, k_proj / v_proj and rotary embedding (state propagation, as in CALM), so later tokens attend to every layer,
and the last one returns the exit's translation A_E h + b_E, which the model's final norm and LM head turn into the
exit head's logits. Prefill runs every layer. `rows="each"` is for measuring: every row exits on its own gate,
every layer still runs and the exited rows' outputs and cache slots are overwritten with the exit's (what a batch-1
cascade computes for each row), with a DynamicCache only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from typing import Any

import torch

from llmcompress.errors import OptionError
from llmcompress.exit_gates import (
    CascadePlan,
    GateScores,
    allowed_errors,
    allowed_nll,
    calibrate_cascade,
    cascade_costs,
    fit_thresholds,
    kl_to_full,
    nll_bound,
    nll_contributions,
    simulate_cascade,
    split_calibration,
)
from llmcompress.exit_heads import DecoderParts, check_ids, decoder_parts

ROW_MODES = ("all", "each")
_RECORD = "record"  # `calibrate_on_cascade`'s run: "each", plus every gate's score and exit top-1 for every row
FILL_MODES = ("exit", "interpolate")


def check_layer_structure(parts: DecoderParts) -> None:
    """The K/V fill re-implements Llama attention's key/value path: input_layernorm → k_proj / v_proj → rotary.
    Anything else (a q/k norm as in Qwen3, a missing projection) is refused with what is missing."""
    for i, layer in enumerate(parts.layers):
        attn = getattr(layer, "self_attn", None)
        missing = [name for name, ok in (
            ("input_layernorm", hasattr(layer, "input_layernorm")), ("self_attn", attn is not None),
            ("self_attn.k_proj", hasattr(attn, "k_proj")), ("self_attn.v_proj", hasattr(attn, "v_proj")),
            ("self_attn.head_dim", hasattr(attn, "head_dim")),
            ("apply_rotary_pos_emb in its module", hasattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb")))
            if not ok]
        extra = [name for name in ("k_norm", "q_norm") if getattr(attn, name, None) is not None]
        if missing or extra:
            raise OptionError(f"early-exit cascade: decoder layer {i} ({type(layer).__name__}) "
                              f"{'lacks ' + ', '.join(missing) if missing else 'has ' + ', '.join(extra)}; the K/V "
                              "fill supports Llama-structured attention (input_layernorm → k_proj / v_proj → rotary), "
                              "the model is left alone")


@dataclasses.dataclass
class _State:
    """Shared by the wrappers during one forward. exit_layer: (batch,) 0 = running, else the exit taken;
    exit_hidden: (batch, 1, hidden) the exit's layer state."""

    exit_layer: torch.Tensor | None = None
    exit_hidden: torch.Tensor | None = None
    decode: bool = False


class _CascadeLayer(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, index: int, plan: CascadePlan, parts: DecoderParts, state: _State,
                 rows: str, stats: dict[str, Any], fill: str = "exit"):
        super().__init__()
        self.layer = layer
        self.index = index  # 0-based; the exit after this layer is index + 1
        self.num_layers = parts.num_layers
        self.plan = plan
        self.heads = plan.heads
        self.head = plan.heads.get(index + 1)
        self.gate = plan.gates.get(index + 1)
        self.parts = parts
        self.state = state
        self.rows = rows
        self.fill = fill
        self.stats = stats
        self.rotate = sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        state = self.state
        if self.index == 0:
            state.decode = hidden_states.shape[1] == 1
            state.exit_layer = torch.zeros(hidden_states.shape[0], dtype=torch.long, device=hidden_states.device)
            state.exit_hidden = None
        exited = state.exit_layer > 0
        if self.rows == "all" and state.decode and bool(exited.all()):
            self._fill(state.exit_hidden, exited, kwargs, append=True)
            return self._output(None, exited)
        out = self.layer(hidden_states, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if self.rows != "all" and state.decode and bool(exited.any()):
            self._fill(state.exit_hidden, exited, kwargs, append=False)
        record = self.rows == _RECORD and self.gate is not None and state.decode
        if self.gate is not None and state.decode and (record or not bool(exited.all())):
            logits = self.head.logits(self.parts, out) if self.gate.logits or record else None
            score = self.gate.score(hidden_states, out, logits if self.gate.logits else None)[:, -1]
            if record:
                target = self.stats.get("target_logp")
                kl = None if target is None else kl_to_full(
                    target, self.plan.output_logits(self.index + 1, logits[:, -1]))
                self.stats.setdefault("records", {}).setdefault(self.index + 1, []).append(
                    (score, logits[:, -1].argmax(-1), kl))
            confident = (score >= self.gate.threshold) & ~exited
            if self.rows == "all":
                confident = confident if bool(confident.all()) else torch.zeros_like(confident)
            if bool(confident.any()):
                exit_hidden = out if state.exit_hidden is None else state.exit_hidden
                state.exit_hidden = torch.where(confident[:, None, None], out, exit_hidden)
                state.exit_layer = torch.where(confident, self.index + 1, state.exit_layer)
                exited = state.exit_layer > 0
        if self.index == self.num_layers - 1 and state.decode:
            self._count(state.exit_layer)
        return self._output(out, exited)

    def _output(self, out: torch.Tensor | None, exited: torch.Tensor) -> torch.Tensor:
        state = self.state
        if not bool(exited.any()):
            return out
        if self.index < self.num_layers - 1:
            if self.rows == _RECORD:  # exited rows go on through the layers: later gates' records need their states
                return out
            return state.exit_hidden if out is None else torch.where(exited[:, None, None], state.exit_hidden, out)
        if out is None:
            self._count(state.exit_layer)
        # the last layer hands the model's final norm + LM head the exit's translation: its logits are the exit's
        translated = torch.empty_like(state.exit_hidden)
        for e in state.exit_layer[exited].unique().tolist():
            rows = state.exit_layer == e
            translated[rows] = self.heads[e].translate(state.exit_hidden[rows])
        return translated if out is None else torch.where(exited[:, None, None], translated, out)

    def _fill(self, hidden: torch.Tensor, rows: torch.Tensor, kwargs: dict[str, Any], *, append: bool) -> None:
        """This layer's key/value slot of the current token from the exit's state (batch, 1, hidden)."""
        attn = self.layer.self_attn
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            return
        hidden = self._interpolate(hidden, rows) if self.fill == "interpolate" else self._fill_state(hidden, rows)
        x = self.layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        _, k = self.rotate(k, k, cos, sin)
        if append:
            cache.update(k, v, attn.layer_idx, kwargs=kwargs)
            return
        layer = cache.layers[attn.layer_idx]
        layer.keys[rows, :, -1:] = k[rows].to(layer.keys.dtype)
        layer.values[rows, :, -1:] = v[rows].to(layer.values.dtype)

    def _fill_state(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """This layer's input per exiting row from its exit's state (`CascadePlan.fill_state`)."""
        if not self.plan.fill_maps:
            return hidden
        out = hidden.clone()
        exit_layer = self.state.exit_layer
        for e in exit_layer[rows].unique().tolist():
            sel = exit_layer == e
            out[sel] = self.plan.fill_state(e, self.index, hidden[sel])
        return out

    def _interpolate(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Layer index i's input estimated between the exit state (exact for the first skipped layer, i = E) and the
        exit's translation (the predicted last-layer state): h + (i − E) / (L − E) · (A h + b − h), per exit."""
        out = hidden.clone()
        exit_layer = self.state.exit_layer
        for e in exit_layer[rows].unique().tolist():
            sel = exit_layer == e
            w = (self.index - e) / (self.num_layers - e)
            out[sel] = hidden[sel] + w * (self.heads[e].translate(hidden[sel]) - hidden[sel])
        return out

    def _count(self, exit_layer: torch.Tensor) -> None:
        stats = self.stats
        if self.rows == _RECORD:
            stats.setdefault("exit_at", []).append(exit_layer.clone())
        stats["tokens"] = stats.get("tokens", 0) + exit_layer.numel()
        skipped = torch.where(exit_layer > 0, self.num_layers - exit_layer, 0)
        stats["layers_skipped"] = stats.get("layers_skipped", 0) + int(skipped.sum())
        by_exit = stats.setdefault("exits", {})
        for e in exit_layer[exit_layer > 0].tolist():
            by_exit[e] = by_exit.get(e, 0) + 1


@contextlib.contextmanager
def cascade(model: torch.nn.Module, plan: CascadePlan, *, rows: str = "all", stats: dict[str, Any] | None = None,
            fill: str = "exit"):
    """While open, the model's decode steps run the cascade; `stats` (a dict, filled in place) counts `tokens`
    (decode-step rows), `layers_skipped` and `exits` {E: tokens}. A declined plan raises: nothing would change."""
    if fill not in FILL_MODES:
        raise OptionError(f"fill: {fill!r}; expected one of {', '.join(FILL_MODES)}")
    if rows not in (*ROW_MODES, _RECORD):
        raise OptionError(f"rows: {rows!r}; expected one of {', '.join(ROW_MODES)}")
    if plan.declined:
        raise OptionError(f"early-exit cascade: the plan was {plan.declined}")
    parts = decoder_parts(model)
    check_layer_structure(parts)
    if max(plan.exits) >= parts.num_layers:
        raise OptionError(f"early-exit cascade: the plan's exits {plan.exits} are outside this model's "
                          f"{parts.num_layers} layers")
    layers = model.model.layers
    originals = list(layers)
    if any(isinstance(m, _CascadeLayer) for m in originals):
        raise OptionError("early-exit cascade: already open on this model")
    state, stats = _State(), ({} if stats is None else stats)
    for i, layer in enumerate(originals):
        layers[i] = _CascadeLayer(layer, i, plan, parts, state, rows, stats, fill)

    def tempered(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        """An exited row's logits are its exit's divided by the exit's temperature (`CascadePlan.output_logits`)."""
        if not state.decode or state.exit_layer is None or not plan.temperatures or not bool(
                (state.exit_layer > 0).any()):
            return out
        out = out.clone()
        for e in state.exit_layer[state.exit_layer > 0].unique().tolist():
            rows = state.exit_layer == e
            out[rows] = plan.output_logits(e, out[rows])
        return out

    handle = parts.lm_head.register_forward_hook(tempered)
    try:
        yield stats
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer


@torch.no_grad()
def cascade_generate(model: torch.nn.Module, input_ids: torch.Tensor, *, plan: CascadePlan,
                     return_stats: bool = False, **generate_kwargs: Any):
    """`model.generate(input_ids, **generate_kwargs)` with the cascade on every decode step (a declined plan decodes
    plainly, stats["declined"] says why). Returns the ids, or (ids, stats) with return_stats."""
    input_ids = check_ids(input_ids, "input_ids")
    generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
    if plan.declined:
        ids = model.generate(input_ids, **generate_kwargs)
        return (ids, {"declined": plan.declined}) if return_stats else ids
    with cascade(model, plan) as stats:
        ids = model.generate(input_ids, **generate_kwargs)
    stats["declined"] = None
    return (ids, stats) if return_stats else ids


def _token_by_token(model: torch.nn.Module, windows: torch.Tensor, before_step: Any = None):
    """Teacher-forced through one DynamicCache: yields (t, float32 logits (n, vocab) predicting windows[:, t + 1]);
    before_step(t), when given, is called before step t's forward."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for t in range(windows.shape[1] - 1):
        if before_step is not None:
            before_step(t)
        yield t, model(windows[:, t: t + 1], cache=cache, use_cache=True).logits[:, -1].float()


def _full_top1(model: torch.nn.Module, windows: torch.Tensor, *, logp: bool = False):
    """The full model's top-1 (n, seq); with logp also (n, seq − 1, vocab) float32 log-probabilities at every
    position but the last, from the same forward."""
    top1, out = [], []
    for w in windows:
        logits = model(w[None]).logits
        top1.append(logits.argmax(-1))
        if logp:
            out.append(torch.log_softmax(logits[:, :-1].float(), -1))
    return (torch.cat(top1), torch.cat(out)) if logp else torch.cat(top1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, plan: CascadePlan | None, windows: torch.Tensor, *,
             fill: str = "exit") -> dict[str, Any]:
    """Teacher-forced, token by token through a DynamicCache: windows (n, seq) → the cascade's own perplexity (its
    logits at each position, the filled cache included; the fixtures README's per-window mean), its top-1 agreement
    with the full model's logits on the same text, and the share of decoder-layer evaluations skipped. plan None:
    the full model through the same loop (for the baseline)."""
    windows = check_ids(windows, "windows")
    parts = decoder_parts(model)
    device = parts.lm_head.weight.device
    windows = windows.to(device)
    full = _full_top1(model, windows)
    stats: dict[str, Any] = {}
    context = contextlib.nullcontext() if plan is None else cascade(model, plan, rows="each", stats=stats, fill=fill)
    losses = torch.zeros(windows.shape[0], dtype=torch.float64)
    agree = 0
    with context:
        for t, logits in _token_by_token(model, windows):
            losses += torch.nn.functional.cross_entropy(logits, windows[:, t + 1], reduction="none").double().cpu()
            agree += int((logits.argmax(-1) == full[:, t]).sum())
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    losses /= windows.shape[1] - 1
    decode_tokens = stats.get("tokens", 0)
    return {"perplexity": math.exp(losses.mean().item()), "agreement": agree / predicted,
            "skip_fraction": stats.get("layers_skipped", 0) / max(decode_tokens * parts.num_layers, 1),
            "exits": dict(sorted(stats.get("exits", {}).items())), "tokens": predicted}


@torch.no_grad()
def calibrate_on_cascade(model: torch.nn.Module, calibration: torch.Tensor, *, min_agreement: float,
                         rounds: int = 4, **calibrate_kwargs: Any) -> CascadePlan:
    """`exit_gates.calibrate_cascade` (heads, gates, fill maps, exits), then `recalibrate` on its held-back rows:
    thresholds that hold where they are used, on the cascade's own filled cache."""
    calibration = check_ids(calibration, "calibration")
    plan = calibrate_cascade(model, calibration, min_agreement=min_agreement, **calibrate_kwargs)
    if plan.declined:
        return plan
    return recalibrate(model, plan, split_calibration(calibration)[1], rounds=rounds)


@torch.no_grad()
def recalibrate(model: torch.nn.Module, plan: CascadePlan, held: torch.Tensor, *, rounds: int = 4) -> CascadePlan:
    """Re-set the plan's thresholds on the running cascade over held-back ids (n, seq), token by token.

    Teacher-forced thresholds (full-model states, full KV) do not hold in the cascade: an exited token's filled K/V
    drift the later tokens' states, and with them the gates' scores and the answers of tokens that never exit (on
    tiny-llama, thresholds meeting 0.99 teacher-forced gave 0.949 on validation). Each round runs the cascade with
    the current thresholds (rows="each" plus a record of every gate's score and exit's top-1 for every row, states
    taken on through the layers), counts its real errors against the full model, and sets the next thresholds on the
    recorded scores (`exit_gates.fit_thresholds`, the plan's costs) charging each approximate K/V fill the errors
    per fill measured so far among tokens that did not exit (the drift; 96 errors from 693 approximate fills on
    tiny-llama's held-back rows, so the re-set thresholds keep mostly exits whose fill is exact). The fastest round
    (predicted time on its records) whose real errors were within the budget is kept; when none was, the plan is
    declined with the numbers. held_back["cascade"]: the kept round's agreement, skip_fraction and errors, and every
    round's."""
    if rounds < 1:
        raise OptionError(f"rounds: {rounds!r}; expected an int ≥ 1")
    if plan.declined:
        raise OptionError(f"early-exit cascade: the plan was {plan.declined}")
    parts = decoder_parts(model)
    num_layers = parts.num_layers
    held = check_ids(held, "held").to(parts.lm_head.weight.device)
    costs = plan.costs if plan.costs is not None else cascade_costs(model)
    logits, exits = plan.features == "logits", plan.exits
    budget_kl = plan.max_perplexity_increase is not None
    full, full_logp = _full_top1(model, held, logp=True) if budget_kl else (_full_top1(model, held), None)
    full = full[:, :-1]
    n = full.numel()
    allowed = allowed_errors(n, plan.min_agreement)
    allowed_kl = allowed_nll(n, plan.max_perplexity_increase)
    thresholds = {e: plan.gates[e].threshold for e in exits}
    history: list[dict[str, Any]] = []
    best, drift_per_fill, drift_kl_per_fill = None, 0.0, 0.0
    for _ in range(rounds):
        trial = dataclasses.replace(plan, gates={e: g.with_threshold(thresholds[e]) for e, g in plan.gates.items()})
        top1, exit_at, scores, added = _record(model, trial, held, full, full_logp)
        nll, nll_upper = float(added.sum()), nll_bound(added)
        errors = int((top1 != full).sum())
        drift = errors - sum(int(((exit_at.flatten() == e) & ~scores.agree[e]).sum()) for e in exits)
        fills = torch.where(exit_at > 0, num_layers - exit_at - 1, 0).sum().item()
        time = simulate_cascade(exits, thresholds, scores, costs, logits)[1]
        skipped = torch.where(exit_at > 0, num_layers - exit_at, 0).sum().item()
        history.append({"thresholds": {e: None if t == math.inf else t for e, t in thresholds.items()},
                        "errors": errors, "drift_errors": drift, "approximate_fills": fills,
                        "agreement": 1 - errors / n, "skip_fraction": skipped / (n * num_layers), "predicted_s": time})
        drift_kl = 0.0
        if budget_kl:  # what the exits' own KL does not explain (scores.drift_kl_per_fill is 0 in a new record)
            drift_kl = nll - float(nll_contributions(scores, exit_at, num_layers).sum())
            history[-1].update({"perplexity_increase": math.expm1(nll / n),
                                "perplexity_increase_bound": math.expm1(nll_upper / n), "drift_nll": drift_kl})
        if errors <= allowed and nll_upper <= allowed_kl and (best is None or time < best[1]):
            best = (dict(thresholds), time, history[-1])
        if fills:  # a round with no approximate fill says nothing about their drift: keep the last estimate
            drift_per_fill = max(drift, 0) / fills
            drift_kl_per_fill = max(drift_kl, 0.0) / fills
        scores.drift_per_fill = drift_per_fill
        scores.drift_kl_per_fill = drift_kl_per_fill
        thresholds, _ = fit_thresholds(exits, scores, costs, logits, allowed, allowed_kl)
    held_back = {**plan.held_back, "cascade": {"tokens": n, "allowed_errors": allowed, "rounds": history}}
    if budget_kl:
        held_back["cascade"]["allowed_nll"] = allowed_kl
    if best is None:
        ppl = (f" and perplexity within +{100 * plan.max_perplexity_increase:g} % at 90 % confidence (least "
               f"{100 * min(h['perplexity_increase_bound'] for h in history):+.2f} %)" if budget_kl else "")
        return dataclasses.replace(plan, heads={}, gates={}, held_back=held_back, declined=(
            f"declined: no thresholds tried in {rounds} rounds kept top-1 agreement ≥ {plan.min_agreement}{ppl} on "
            f"the running cascade over the held-back rows (budget {allowed:.1f} errors of {n}; fewest "
            f"{min(h['errors'] for h in history)})"))
    thresholds, time, row = best
    kept = [e for e in exits if thresholds[e] <= 1.0]  # a gate scores a probability: above 1 it never opens
    kept_keys = ("agreement", "skip_fraction", "errors", "perplexity_increase", "perplexity_increase_bound")
    held_back["cascade"].update({k: row[k] for k in kept_keys if k in row})
    dropped = {**plan.dropped, **{e: f"exit {e} dropped: closed by the thresholds set on the running cascade"
                                   for e in exits if e not in kept}}
    return dataclasses.replace(
        plan, heads={e: plan.heads[e] for e in kept}, gates={e: plan.gates[e].with_threshold(thresholds[e])
                                                            for e in kept},
        fill_maps={k: m for k, m in plan.fill_maps.items() if k[0] in kept}, held_back=held_back, dropped=dropped,
        predicted={"cascade_s": time, "full_s": costs.full, "speedup": costs.full / time},
        declined=None if kept else "declined: the running cascade's thresholds closed every exit")


def _record(model: torch.nn.Module, plan: CascadePlan, windows: torch.Tensor, full: torch.Tensor,
            full_logp: torch.Tensor | None = None):
    """The cascade over windows (n, seq) with records → (its top-1 (n, seq − 1), exit per token (0: none),
    `GateScores` of every gate on every token (agreement of each exit with `full` (n, seq − 1); with full_logp
    (n, seq − 1, vocab) also each exit's KL), the nats its own logits add to the full model's NLL in expectation
    per token (KL(full ‖ cascade), flattened; zeros without full_logp))."""
    stats: dict[str, Any] = {}
    top1, nll = [], []

    def target(t: int) -> None:
        if full_logp is not None:
            stats["target_logp"] = full_logp[:, t]

    with cascade(model, plan, rows=_RECORD, stats=stats):
        for t, logits in _token_by_token(model, windows, target):
            top1.append(logits.argmax(-1))
            if full_logp is not None:
                nll.append(kl_to_full(full_logp[:, t], logits).double().cpu())
    exit_at = torch.stack(stats["exit_at"], 1).flatten()
    score, agree, kl = {}, {}, {}
    for e, steps in stats["records"].items():
        score[e] = torch.stack([s for s, _, _ in steps], 1).flatten().double()
        agree[e] = torch.stack([a for _, a, _ in steps], 1).flatten() == full.flatten()
        if full_logp is not None:
            kl[e] = torch.stack([k for _, _, k in steps], 1).flatten().double()
    scores = GateScores(score, agree, kl=kl if full_logp is not None else None)
    per_token = torch.stack(nll, 1).flatten() if nll else torch.zeros(full.numel(), dtype=torch.float64)
    return torch.stack(top1, 1), exit_at.view_as(full), scores, per_token
