"""Exact self-speculative decoding: the first E decoder layers + a fitted exit head draft k tokens, the full model
verifies them in one forward and keeps the longest agreeing prefix plus its own next token, so the output is the
model's own greedy output. Entry points: `self_speculative_generate`; `SelfSpeculativeDecoding`, the same through
HF `generate(custom_generate=...)`; `measure_step_costs` times the parts the cost model (`cost/decode_step.py`)
combines.

The draft and the verify share one DynamicCache: a drafted token's key/values in layers < E are exactly what the
full model computes there (those layers see only earlier layers), so the verify runs layers < E on the last draft
alone and layers ≥ E on all k + 1 positions from the saved layer-E states; a rejection crops every layer back.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from llmcompress.cost import decode_step
from llmcompress.cost.hardware import resolve
from llmcompress.cost.roofline import CostModel
from llmcompress.errors import OptionError
from llmcompress.exit_head_cache import cached_exit_heads
from llmcompress.exit_heads import DecoderParts, ExitHead, check_exit_layer, check_ids, decoder_parts, layer_states

AUTO_MAX_DRAFT_LEN = 8
"""Largest k "auto" considers: at acceptance 0.76 (tiny-llama's best exit) 0.76^8 ≈ 0.11 of the 8th draft survives."""

_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "typical_p", "num_beams", "num_beam_groups", "penalty_alpha")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What "auto" measured and chose. acceptance[E]: teacher-forced top-1 agreement of exit E on held-back
    calibration; speedup[(E, k)]: the cost model's prediction."""

    exit_layer: int | None
    draft_len: int | None
    acceptance: dict[int, float]
    speedup: dict[tuple[int, int], float]
    declined: str | None


def self_speculative_generate(model: torch.nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int,
                              calibration: torch.Tensor, exit_layer: int | str = "auto", draft_len: int | str = "auto",
                              return_stats: bool = False, **generate_kwargs: Any):
    """Greedy decoding of `max_new_tokens` (stopping at the model's EOS, as `generate` does), token-identical to
    `model.generate(input_ids, do_sample=False)`.

    input_ids: (1, prompt) token ids; calibration: (n, seq) token ids the exit head is fitted on ("auto" holds back
    the last quarter of the rows, at least one, to measure acceptance, so it needs n ≥ 2).
    exit_layer: 1 … L−1 or "auto"; draft_len: ≥ 1 or "auto". Explicit values always speculate; "auto" asks the cost
    model and decodes plainly (stats["declined"] says why) where no (E, k) is predicted faster.
    Returns the ids (1, prompt + new); with return_stats, (ids, stats)."""
    parts = decoder_parts(model)
    _check_generate_kwargs(generate_kwargs)
    input_ids = check_ids(input_ids, "input_ids")
    calibration = check_ids(calibration, "calibration")
    if input_ids.shape[0] != 1:
        raise OptionError(f"input_ids: batch {input_ids.shape[0]}; self-speculative decoding supports batch 1 (rows "
                          "accept different numbers of drafts)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise OptionError(f"max_new_tokens: {max_new_tokens!r}; expected an int ≥ 1")
    if exit_layer != "auto":
        check_exit_layer(exit_layer, parts.num_layers)
    if draft_len != "auto" and (isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1):
        raise OptionError(f"draft_len: {draft_len!r}; expected an int ≥ 1 or 'auto'")
    _check_attention(model)

    eos = model.generation_config.eos_token_id

    def plain() -> torch.Tensor:
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                              do_sample=False)

    ids, stats = _decode(model, parts, input_ids, max_new_tokens, calibration, exit_layer, draft_len, eos, plain)
    return (ids, stats) if return_stats else ids


def _decode(model, parts: DecoderParts, input_ids: torch.Tensor, max_new_tokens: int, calibration: torch.Tensor,
            exit_layer: int | str, draft_len: int | str, eos: Any, plain) -> tuple[torch.Tensor, dict[str, Any]]:
    """Speculate at the explicit or planned (E, k), or `plain()` where "auto" declined."""
    stats: dict[str, Any] = {"drafted": 0, "accepted": 0, "acceptance_rate": 0.0, "verify_steps": 0,
                             "exit_layer": exit_layer, "draft_len": draft_len, "declined": None}
    if exit_layer == "auto" or draft_len == "auto":
        plan = plan_speculation(model, calibration, exit_layer=exit_layer, draft_len=draft_len)
        stats.update(acceptance_by_exit=plan.acceptance, declined=plan.declined, exit_layer=plan.exit_layer,
                     draft_len=plan.draft_len,
                     predicted_speedup=plan.speedup.get((plan.exit_layer, plan.draft_len)) if not plan.declined
                     else max(plan.speedup.values(), default=None))
        if plan.declined:
            return plain(), stats
    head = cached_exit_heads(model, calibration, [stats["exit_layer"]])[stats["exit_layer"]]
    ids = _speculate(model, parts, head, input_ids, max_new_tokens, stats["draft_len"], stats, eos)
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    return ids, stats


class SelfSpeculativeDecoding:
    """Self-speculative decoding through HF `generate`: its `custom_generate` hook (transformers ≥ 4.56 takes a
    callable that replaces the decoding loop after generate has prepared the inputs, the logits processors and
    the stopping criteria), so `model.generate(ids, max_new_tokens=n, do_sample=False,
    custom_generate=SelfSpeculativeDecoding(calibration, exit_layer=3, draft_len=2))` returns generate's own greedy
    ids. `stats` holds the last call's counts (as `self_speculative_generate(..., return_stats=True)`).

    Exact for greedy decoding with no logits processor (a repetition penalty, min_length, bad words ... would change
    the verify's tokens and the drafts alike: rejected, not approximated) and max-length / EOS stopping only.
    transformers' own `assistant_early_exit` is not used: it drafts with the plain logit lens (the exit without our
    fitted translation) and keeps a separate cache for the draft."""

    def __init__(self, calibration: torch.Tensor, *, exit_layer: int | str = "auto",
                 draft_len: int | str = "auto") -> None:
        self.calibration = check_ids(calibration, "calibration")
        self.exit_layer, self.draft_len = exit_layer, draft_len
        if draft_len != "auto" and (isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1):
            raise OptionError(f"draft_len: {draft_len!r}; expected an int ≥ 1 or 'auto'")
        self.stats: dict[str, Any] = {}

    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

        parts = decoder_parts(model)
        if self.exit_layer != "auto":
            check_exit_layer(self.exit_layer, parts.num_layers)
        _check_attention(model)
        if generation_config.do_sample or (generation_config.num_beams or 1) > 1:
            raise OptionError(f"do_sample={generation_config.do_sample!r}, num_beams={generation_config.num_beams!r}"
                              ": self-speculative decoding is exact for greedy decoding only; allowed: "
                              "do_sample=False, num_beams=1")
        if generation_config.return_dict_in_generate:
            raise OptionError("return_dict_in_generate=True: self-speculative decoding returns the ids only")
        if len(logits_processor):
            raise OptionError(f"logits processors {', '.join(type(p).__name__ for p in logits_processor)}: "
                              "self-speculative decoding keeps plain greedy decoding exact only; allowed: none")
        others = [type(c).__name__ for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria,
                                                                                     EosTokenCriteria))]
        if others:
            raise OptionError(f"stopping criteria {', '.join(others)}: self-speculative decoding stops at "
                              "max_length / max_new_tokens and EOS only")
        if input_ids.shape[0] != 1:
            raise OptionError(f"input_ids: batch {input_ids.shape[0]}; self-speculative decoding supports batch 1")
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise OptionError("attention_mask: padded positions; self-speculative decoding takes an unpadded prompt")
        cache = model_kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            raise OptionError("cache: a filled cache was passed; self-speculative decoding starts from the prompt")
        max_new_tokens = generation_config.max_length - input_ids.shape[1]

        def plain() -> torch.Tensor:
            return type(model)._sample(model, input_ids, logits_processor=logits_processor,
                                       stopping_criteria=stopping_criteria, generation_config=generation_config,
                                       **model_kwargs)

        ids, self.stats = _decode(model, parts, input_ids, max_new_tokens, self.calibration, self.exit_layer,
                                  self.draft_len, generation_config.eos_token_id, plain)
        return ids


def _check_generate_kwargs(kwargs: dict[str, Any]) -> None:
    for key, value in kwargs.items():
        if key == "do_sample" and value is False:
            continue
        if key == "do_sample" or key in _SAMPLING:
            raise OptionError(f"{key}={value!r}: self-speculative decoding is exact for greedy decoding only; "
                              "allowed: do_sample=False (the default)")
        raise OptionError(f"unknown argument {key!r}; self_speculative_generate takes max_new_tokens, calibration, "
                          "exit_layer, draft_len, return_stats (and do_sample=False)")


def _check_attention(model: torch.nn.Module) -> None:
    """One causal mask serves every layer only when no layer uses a sliding window."""
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or [])
    sliding = kinds - {"full_attention"} if kinds else (
        {"sliding_window"} if getattr(config, "sliding_window", None) is not None else set())
    if sliding:
        raise OptionError(f"self-speculative decoding: {type(model).__name__} uses {', '.join(sorted(sliding))} "
                          "attention; supported: full causal attention in every layer")


def _run_layers(model: torch.nn.Module, parts: DecoderParts, hidden: torch.Tensor, start: int, stop: int,
                cache: Any, first_position: int) -> torch.Tensor:
    """layers[start:stop] on hidden (1, q, hidden) at positions first_position …, appending to their cache."""
    from transformers.masking_utils import create_causal_mask

    q = hidden.shape[1]
    position_ids = torch.arange(first_position, first_position + q, device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                              position_ids=position_ids, layer_idx=start)
    rotary = parts.rotary(hidden, position_ids=position_ids)
    for layer in parts.layers[start:stop]:
        out = layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                    position_embeddings=rotary)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.no_grad()
def _speculate(model, parts: DecoderParts, head: ExitHead, input_ids: torch.Tensor, max_new_tokens: int, k: int,
               stats: dict[str, Any], eos: Any = None, timer: Timer | None = None) -> torch.Tensor:
    """eos: the id(s) that end decoding (None: none); timer: records each part's time (`measure_step_costs`)."""
    timed = timer or _untimed
    from transformers import DynamicCache

    e, n_layers = head.layer, parts.num_layers
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    cache = DynamicCache(config=model.config)
    # Prefill the whole prompt as generate does; the cache then holds every position but the pending last token.
    hidden = _run_layers(model, parts, parts.embed(input_ids), 0, n_layers, cache, 0)
    seq = torch.cat([input_ids, parts.lm_head(parts.norm(hidden[:, -1:])).argmax(-1)], dim=1)
    produced = 1
    while produced < max_new_tokens and seq[0, -1].item() not in eos:
        past = seq.shape[1] - 1
        k_step = min(k, max_new_tokens - produced - 1)  # a step yields accepted + 1 ≤ k_step + 1 tokens
        token, states, drafts = seq[:, -1:], [], []
        for i in range(k_step):
            x = parts.embed(token)
            states.append(timed("draft", _run_layers, model, parts, x, 0, e, cache, past + i))
            token = timed("exit_head", head.logits, parts, states[-1]).argmax(-1)
            drafts.append(token)
        x = parts.embed(token)
        states.append(timed("draft", _run_layers, model, parts, x, 0, e, cache, past + k_step))
        hidden = timed(("verify", k_step + 1), _run_layers, model, parts, torch.cat(states, dim=1), e, n_layers,
                       cache, past)
        greedy = timed(("lm_head", k_step + 1), _final_logits, parts, hidden).argmax(-1)
        accepted = 0
        while accepted < k_step and drafts[accepted].item() == greedy[0, accepted].item():
            accepted += 1
        new = greedy[:, : accepted + 1]  # the agreeing drafts equal greedy's tokens there
        stops = [i for i, t in enumerate(new[0].tolist()) if t in eos]
        if stops:
            new = new[:, : stops[0] + 1]
        seq = torch.cat([seq, new], dim=1)
        produced += new.shape[1]
        if k_step > accepted:
            cache.crop(accepted - k_step)  # transformers 5: a negative count removes that many from the end
        stats["drafted"] += k_step
        stats["accepted"] += accepted
        stats["verify_steps"] += 1
    return seq


def step_costs(model: torch.nn.Module, hardware: str = "auto") -> dict[str, float]:
    """Roofline seconds (`CostModel.kernel_time`) of one decoder layer (mean), the final norm + LM head, an exit
    head (translation + norm + LM head), and one full decode forward, at one row: `cost.decode_step`'s inputs.
    No host overhead: where that dominates (tiny models on a CPU) use `measure_step_costs`."""
    parts = decoder_parts(model)
    weight = parts.lm_head.weight
    cost = CostModel(resolve(hardware, weight.device))
    hidden = weight.shape[1]
    layer = sum(decode_step.weights_time(cost, [m], weight.dtype) for m in parts.layers) / parts.num_layers
    lm_head = (decode_step.weights_time(cost, [parts.lm_head], weight.dtype)
               + decode_step.weights_time(cost, [parts.norm], weight.dtype))
    translation = cost.kernel_time(2 * hidden * hidden, hidden * (hidden + 1) * weight.element_size(), weight.dtype,
                                   rows=1)
    return {"layer": layer, "lm_head": lm_head, "exit_head": lm_head + translation, "num_layers": parts.num_layers,
            "full": parts.num_layers * layer + lm_head}


def predicted_speedup(tokens_per_step: float, exit_layer: int, draft_len: int, costs: dict[str, float]) -> float:
    """`cost.decode_step.predicted_speedup`: tokens per verify step × plain step ÷ speculative step (k + 1 runs of
    the first E layers, k exit heads, layers ≥ E and the LM head on k + 1 rows). Measured on tiny-llama (CPU,
    contended, 64 new tokens, exit 5, k = 1): 0.85–0.90× plain; the issue's k·E/L + 1 − E/L + head predicted
    1.49×, this one (roofline parts) 0.92×."""
    return decode_step.predicted_speedup(tokens_per_step, exit_layer, draft_len, costs)


class Timer:
    """Times of the parts of `_speculate`'s loop, by part: "draft" (layers < E, one row), "exit_head",
    ("verify", rows) (layers ≥ E), ("lm_head", rows)."""

    def __init__(self, clock, device: torch.device) -> None:
        self.clock, self.device = clock, device
        self.times: dict[Any, list[float]] = {}

    def __call__(self, part: Any, fn, *args):
        _sync(self.device)
        t = self.clock()
        out = fn(*args)
        _sync(self.device)
        self.times.setdefault(part, []).append(self.clock() - t)
        return out

    def median(self, part: Any) -> float | None:
        return statistics.median(self.times[part]) if self.times.get(part) else None


def _untimed(part: Any, fn, *args):
    return fn(*args)


def _final_logits(parts: DecoderParts, hidden: torch.Tensor) -> torch.Tensor:
    return parts.lm_head(parts.norm(hidden))


@torch.no_grad()
def measure_step_costs(model: torch.nn.Module, head: ExitHead, *, prompt_len: int = 16, new_tokens: int = 32,
                       max_rows: int = AUTO_MAX_DRAFT_LEN + 1, clock=time.perf_counter) -> dict[str, Any]:
    """`cost.decode_step`'s inputs measured on the model's device, through whatever its modules run (eager or
    compiled), inside the loops they price: `_speculate` at head.layer = E for each k = 1 … max_rows − 1 on a
    random prompt (medians of its draft slices, exit heads, verify slices and LM heads by rows; synchronised on
    CUDA), and generate's step (the slope of its time over 8 vs 8 + new_tokens tokens). Timed in the loops, not
    alone: alone, the parts find their weights in the caches; in the loop every other weight streams through them
    between two calls (tiny-llama's exit head: 0.20 ms alone, 0.79 ms in the loop, CPU).

    The host work of a call running a slice of layers (`run_overhead`) is timed alone (a call running none).
    clock: `time.process_time` on a shared CPU counts this process's work only (at one torch thread: spinning
    OpenMP workers count too)."""
    from transformers import DynamicCache

    parts = decoder_parts(model)
    device = parts.lm_head.weight.device
    e, n = head.layer, parts.num_layers
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(parts.lm_head.weight.shape[0], (1, prompt_len), generator=g).to(device)
    timer = Timer(clock, device)
    for k in range(1, max_rows):
        _speculate(model, parts, head, prompt, new_tokens, k, {"drafted": 0, "accepted": 0, "verify_steps": 0},
                   None, timer)
    cache = DynamicCache(config=model.config)
    x = parts.embed(prompt[:, :1])
    run = statistics.median(_repeat(lambda: _run_layers(model, parts, x, 0, 0, cache, 0), clock, device, 20))
    layer = max(timer.median("draft") - run, 0.0) / e
    layer_at = {1: layer}
    head_at = {}
    for rows in range(2, max_rows + 1):
        if timer.median(("verify", rows)) is not None:
            layer_at[rows] = max(timer.median(("verify", rows)) - run, 0.0) / (n - e)
            head_at[rows] = timer.median(("lm_head", rows))
    lm_head = timer.median(("lm_head", 1)) or min(head_at.values())
    head_at[1] = lm_head
    top = max(layer_at)
    costs = {"layer": layer, "layer_per_row": (layer_at[top] - layer) / max(top - 1, 1), "lm_head": lm_head,
             "lm_head_per_row": (head_at[top] - lm_head) / max(top - 1, 1), "layer_at_rows": layer_at,
             "lm_head_at_rows": head_at, "exit_head": timer.median("exit_head"), "run_overhead": run, "num_layers": n}

    def generate(tokens: int) -> None:
        model.generate(prompt[:, :8], attention_mask=torch.ones_like(prompt[:, :8]), max_new_tokens=tokens,
                       do_sample=False)

    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None  # every call makes n
    try:
        short = statistics.median(_repeat(lambda: generate(8), clock, device, 3))
        long = statistics.median(_repeat(lambda: generate(8 + new_tokens), clock, device, 3))
    finally:
        model.generation_config.eos_token_id = eos
    costs["plain_overhead"] = max((long - short) / new_tokens - decode_step.plain_step_s(costs), 0.0)
    costs["full"] = decode_step.plain_step_s(costs)
    return costs


def _repeat(fn, clock, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        t = clock()
        fn()
        _sync(device)
        times.append(clock() - t)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokens_per_step(agree: torch.Tensor, k: int) -> float:
    """agree: (n, seq) bool, exit top-1 == full top-1 per position (teacher-forced). Mean over start positions of
    1 + the run of agreements from there, capped at k (the drafts a verify keeps, plus its own token)."""
    n, seq = agree.shape
    if seq < k:
        raise OptionError(f"calibration: sequences of {seq} tokens are shorter than draft_len {k}")
    run = torch.zeros(n, seq - k + 1, dtype=torch.float64)
    alive = torch.ones_like(run, dtype=torch.bool)
    for i in range(k):
        alive &= agree[:, i: i + seq - k + 1]
        run += alive
    return 1 + run.mean().item()


@torch.no_grad()
def plan_speculation(model: torch.nn.Module, calibration: torch.Tensor, *, exit_layer: int | str = "auto",
                     draft_len: int | str = "auto", hardware: str = "auto",
                     costs: dict[str, float] | None = None) -> Plan:
    """Fit exits on the first rows of calibration, measure agreement on the held-back rows, and pick the (E, k) the
    cost model predicts fastest; declined when none beats plain decoding (predicted speedup ≤ 1).
    costs: `cost.decode_step`'s inputs (`measure_step_costs`); default the roofline's (`step_costs`)."""
    parts = decoder_parts(model)
    calibration = check_ids(calibration, "calibration")
    if calibration.shape[0] < 2:
        raise OptionError(f"calibration: {calibration.shape[0]} sequence(s); 'auto' needs ≥ 2 (it fits on some and "
                          "measures acceptance on the others)")
    held = max(1, calibration.shape[0] // 4)
    exits = list(range(1, parts.num_layers)) if exit_layer == "auto" else [exit_layer]
    lengths = list(range(1, AUTO_MAX_DRAFT_LEN + 1)) if draft_len == "auto" else [draft_len]
    heads = cached_exit_heads(model, calibration[:-held], exits)
    states = layer_states(model, calibration[-held:].to(parts.lm_head.weight.device))
    full = parts.lm_head(parts.norm(states[-1])).argmax(-1)
    costs = step_costs(model, hardware) if costs is None else costs
    acceptance, speedup = {}, {}
    for e in exits:
        agree = (heads[e].logits(parts, states[e]).argmax(-1) == full).cpu()
        acceptance[e] = agree.double().mean().item()
        for k in lengths:
            speedup[(e, k)] = predicted_speedup(tokens_per_step(agree, k), e, k, costs)
    best = max(speedup, key=speedup.get)
    if speedup[best] <= 1.0:
        return Plan(None, None, acceptance, speedup,
                    f"declined: no exit layer / draft length is predicted faster than plain decoding (best "
                    f"{speedup[best]:.2f}× at exit {best[0]}, k={best[1]}, acceptance {acceptance[best[0]]:.2f})")
    return Plan(best[0], best[1], acceptance, speedup, None)
