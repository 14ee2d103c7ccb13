"""What an early-exit cascade's gates could learn (issue 16), on the trained tiny-llama fixture, in one run: `main`.

`early_exit_ceiling.py` shows the gates reach a third of what a perfect gate would. This script asks whether another
gate would do better: each variant is fitted per exit on the same rows (`--calib` 512-token windows of train.txt,
the first ¾; exit heads and temperatures as `calibrate_cascade` fits them, least squares), and its exits and
thresholds are chosen by `exit_gates.choose_exits` (prices in layer counts, `--budget`), twice:
* on the held-back ¼ of the calibration rows with `calibrate_cascade`'s margins ("held-back"), as a real cascade;
* on the validation tokens themselves with plain budgets ("on validation"): how well the gate ranks the tokens,
  apart from how its thresholds carry over from one text to another.
Both judged teacher-forced on `--windows` 512-token validation windows: share of decoder-layer evaluations skipped,
top-1 agreement with the full model, perplexity increase.

Variants (label the gate learns / its features, `exit_gates.fit_gate`):
* `agree / logits`: today's gates (top-1 agreement; the exit's top-5 log-probabilities and probabilities, margin,
  entropy and three state scalars, `gate_features`), a 32-unit hidden layer;
* the same as logistic regression, or with 128 hidden units; the same fitted on half the rows;
* `agree / logits + previous exit`: also whether exit E's top-1 equals exit E−1's, the KL between them and the
  probability exit E−1 gave exit E's top-1 (the exit before it is computed anyway when its gate ran);
* `agree / logits + state`: also the RMS-normalised state (L2 0.1);
* `agree and KL < τ / logits`, `agree × exp(−KL/τ) / logits` (soft labels): labels that also carry the perplexity
  budget, which is the one that binds;
* `oracle`: each token's own KL and top-1 (`early_exit_ceiling.oracle_scores`): the best any gate could rank.

JSON (`--out`, default benchmarks/results/early_exit_gates.json): {device, commit, versions, threads, setup,
gates: {variant: {held-back | on validation: {exits, skip_fraction, agreement, perplexity_increase}}}}.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from early_exit_ceiling import judged, oracle_scores, parse_budgets  # benchmarks/, the script's folder, is on sys.path

from llmcompress.exit_gates import (
    GateScores,
    fit_gate,
    fit_temperature,
    gate_features,
    kl_to_full,
    split_calibration,
)
from llmcompress.exit_heads import decoder_parts, fit_heads_from_states, layer_states
from llmcompress.testing.fixtures import (
    WINDOW,
    corpus_windows,
    fixtures_dir,
    load_model,
    load_tokenizer,
    spread_windows,
)
from llmcompress.testing.results import run_info, write_results

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def exit_rows(parts, heads, temperatures, states) -> dict[int, dict[str, torch.Tensor]]:
    """Per exit, flattened over the tokens: logits features, previous-exit features, normalised state, top-1
    agreement with the full model and KL(full ‖ tempered exit)."""
    full_logp = torch.cat([torch.log_softmax(parts.lm_head(parts.norm(c)).float(), -1) for c in states[-1].split(4)])
    full_top = full_logp.argmax(-1).flatten()
    out, prev = {}, None
    for e in sorted(heads):
        logits = torch.cat([heads[e].logits(parts, c).float() for c in states[e].split(4)]) / temperatures[e]
        logp = torch.log_softmax(logits, -1)
        top = logp.argmax(-1, keepdim=True)
        if prev is None:
            extra = torch.zeros(top.numel(), 3)
        else:
            extra = torch.stack([(top == prev.argmax(-1, keepdim=True)).float().flatten(),
                                 (logp.exp() * (logp - prev)).sum(-1).flatten(),
                                 prev.gather(-1, top).exp().flatten()], 1)
        state = states[e].float()
        out[e] = {"logits": gate_features(states[e - 1], states[e], logits).flatten(0, -2), "previous": extra,
                  "state": (state / state.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)).flatten(0, -2),
                  "agree": top.flatten() == full_top, "kl": kl_to_full(full_logp, logits).flatten()}
        prev = logp
        del logits
    return out


def features(kind: str) -> Callable[[dict], torch.Tensor]:
    parts = {"logits": ("logits",), "previous": ("logits", "previous"), "state": ("logits", "state")}[kind]
    return lambda row: torch.cat([row[p] for p in parts], 1)


def variants() -> dict[str, dict]:
    agree = lambda row: row["agree"]  # noqa: E731
    return {
        "agree / logits (today's gates)": {"label": agree, "features": "logits"},
        "agree / logits, logistic": {"label": agree, "features": "logits", "hidden": 0},
        "agree / logits, 128 hidden": {"label": agree, "features": "logits", "hidden": 128},
        "agree / logits, half the rows": {"label": agree, "features": "logits", "rows": 0.5},
        "agree / logits + previous exit": {"label": agree, "features": "previous"},
        "agree / logits + state": {"label": agree, "features": "state", "l2": 0.1},
        "agree and KL < 0.05 / logits": {"label": lambda r: r["agree"] & (r["kl"] < 0.05), "features": "logits"},
        "agree × exp(-KL/0.1) / logits": {"label": lambda r: r["agree"].double() * torch.exp(-r["kl"].double() / 0.1),
                                          "features": "logits"},
    }


def gate_scores(spec: dict, fit, held, val) -> tuple[dict, dict]:
    """The variant's gate per exit fitted on `fit`, its scores on `held` and `val`."""
    feats = features(spec["features"])
    scores_held, scores_val = {}, {}
    for e in sorted(fit):
        x, y = feats(fit[e]), spec["label"](fit[e])
        n = int(x.shape[0] * spec.get("rows", 1.0))
        gate = fit_gate(e, x[:n], y[:n], logits=True, hidden_units=spec.get("hidden", 32), l2=spec.get("l2", 1e-2))
        for rows, out in ((held, scores_held), (val, scores_val)):
            z = (feats(rows[e]) - gate.mean) / gate.std
            if gate.hidden_weight is not None:
                z = torch.nn.functional.gelu(z @ gate.hidden_weight + gate.hidden_bias)
            out[e] = torch.sigmoid(z @ gate.weight + gate.bias)
    return scores_held, scores_val


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=WINDOW, help="tokens per window (smaller only for smoke runs)")
    parser.add_argument("--budget", default="0.99:0.02", help="min_agreement:max_perplexity_increase (none: no bound)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "early_exit_gates.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    (a, p), = parse_budgets(args.budget)
    fixtures = fixtures_dir()
    model, tokenizer = load_model(fixtures, "tiny-llama"), load_tokenizer(fixtures)
    parts = decoder_parts(model)
    exits = list(range(1, parts.num_layers))
    fit_ids, held_ids = split_calibration(spread_windows(fixtures, tokenizer, "train.txt", args.calib, args.window))
    val_ids = corpus_windows(fixtures, tokenizer, "validation.txt", args.windows, args.window)

    t = time.perf_counter()
    with torch.no_grad():
        fit_states = layer_states(model, fit_ids)
        heads = fit_heads_from_states(fit_states, exits, dtype=parts.lm_head.weight.dtype)
        fit_top = torch.cat([parts.lm_head(parts.norm(c)).argmax(-1) for c in fit_states[-1].split(4)])
        temperatures = {}
        for e in exits:
            logits = torch.cat([heads[e].logits(parts, c).float() for c in fit_states[e].split(4)])
            temperatures[e] = fit_temperature(parts, logits, fit_states[-1], (logits.argmax(-1) == fit_top).flatten())
            del logits
        fit = exit_rows(parts, heads, temperatures, fit_states)
        del fit_states
        held = exit_rows(parts, heads, temperatures, layer_states(model, held_ids))
        val = exit_rows(parts, heads, temperatures, layer_states(model, val_ids))
    print(f"rows: {time.perf_counter() - t:.0f} s", file=sys.stderr)

    def as_scores(scores: dict, rows: dict) -> GateScores:
        return GateScores(scores, {e: rows[e]["agree"] for e in exits}, kl={e: rows[e]["kl"] for e in exits})

    results = {}
    for name, spec in variants().items():
        t = time.perf_counter()
        s_held, s_val = gate_scores(spec, fit, held, val)
        results[name] = judged(as_scores(s_held, held), as_scores(s_val, val), parts.num_layers, a, p)
        results[name]["seconds"] = round(time.perf_counter() - t, 1)
    tables = {split: {e: (rows[e]["kl"], rows[e]["agree"]) for e in exits} for split, rows in (("held", held),
                                                                                                ("val", val))}
    results["oracle"] = judged(oracle_scores(tables["held"]), oracle_scores(tables["val"]), parts.num_layers, a, p)
    for name, row in results.items():
        print(f"{name:34s} " + " | ".join(
            f"{where}: exits {r['exits']} skip {100 * r['skip_fraction']:.1f} % agreement {r['agreement']:.4f} "
            f"+{100 * r['perplexity_increase']:.2f} %" for where, r in row.items() if where != "seconds"),
            file=sys.stderr)

    held_n = max(1, args.calib // 4)
    write_results(args.out, {
        **run_info(ROOT, args.threads),
        "setup": {"calibration": f"train.txt, {args.calib} x {args.window} spread windows (heads and gates on the "
                                 f"first {args.calib - held_n}, held-back thresholds on the last {held_n})",
                  "validation": f"{args.windows} x {args.window} from validation.txt, teacher-forced (the full "
                                "model's states)",
                  "budget": args.budget, "heads": "fitted (ridge least squares), temperatures as calibrate_cascade",
                  "prices": "layer counts (skip the most)"},
        "gates": results})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
