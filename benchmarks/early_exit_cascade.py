"""The early-exit cascade on the trained tiny-llama fixture (issue 16), in one run: `main`.

1. Per exit layer E, on `--windows` non-overlapping 512-token windows of validation.txt (default 16), the exit alone
   (its head on the full model's layer-E states, teacher-forced): top-1 agreement with the full model and perplexity,
   logit lens vs fitted translation (heads fitted on the first ¾ of `--calib` 512-token windows spread over
   train.txt, default 64: 48 × 512 tokens, as `exit_gates.calibrate_cascade` fits them; the gates need the data).
2. Cascades calibrated at `--min-agreement` (default 0.99) and `--max-perplexity-increase` (default 0.02) on those
   calibration windows, skipped layers' K/V filled through fitted maps (`exit_gates.fit_fill_maps`), exit logits
   divided by fitted temperatures, thresholds re-set on the running cascade over the held-back rows
   (`cascade.calibrate_on_cascade`): "cost" (the exits and gate features the cost model keeps, `cascade_costs` on
   this machine) and "max-skip" (layer counts as prices, logits gates: what the gates can do when exit heads are
   free); "max-skip-teacher-forced" is max-skip with its teacher-forced thresholds (before `recalibrate`), measured
   with fitted fill maps and with the exit state as fill (`validation_fill_exit`); "max-skip-agreement-only" drops
   the perplexity budget; "max-skip A/P" re-sets max-skip's thresholds to the `--frontier` budgets (where the skip
   grows as the budgets loosen).
   Each runs token by token over the validation windows with its own filled KV cache (`cascade.evaluate`,
   rows="each"): perplexity of its own logits against the full model's through the same loop, top-1 agreement,
   share of decoder-layer evaluations skipped, tokens per exit.
3. Decode speed, eager (no torch.compile), batch 1: `--prompts` prompts (24 tokens from the start of validation
   windows) × `--new-tokens` greedy tokens, `generate` vs `cascade_generate` with the "cost" plan (median of
   `--repeats`), against the cost model's predicted speedup (skipped when the cost model declines).

JSON (`--out`, default `benchmarks/results/early_exit_cascade.json`): {"device", "versions", "commit", "threads",
"setup", "exits": {E: {agreement_lens, agreement_fitted, perplexity_lens, perplexity_fitted}}, "full_perplexity",
"cascades": {name: {min_agreement, exits, features, thresholds, dropped, declined, held_back, predicted, validation:
{perplexity, perplexity_ratio, agreement, skip_fraction, exits}}}, "decode": {...}}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from llmcompress.cascade import calibrate_on_cascade, cascade_generate, evaluate, recalibrate
from llmcompress.cost.device_profile import device_name
from llmcompress.exit_gates import CascadeCosts, calibrate_cascade, cascade_costs, split_calibration
from llmcompress.exit_heads import ExitHead, decoder_parts, fit_exit_heads, layer_states
from llmcompress.testing.fixtures import (
    WINDOW,
    corpus_windows,
    fixtures_dir,
    load_model,
    load_tokenizer,
    perplexity,
    spread_windows,
)

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def exit_quality(model, heads: dict[int, ExitHead], windows: torch.Tensor) -> dict[int, dict[str, float]]:
    parts = decoder_parts(model)
    out = {}
    for e, head in sorted(heads.items()):
        stats = {"agree_lens": 0.0, "agree_fitted": 0.0, "nll_lens": 0.0, "nll_fitted": 0.0}
        for w in windows.split(4):
            states = layer_states(model, w)
            full = parts.lm_head(parts.norm(states[-1])).argmax(-1)[:, :-1]
            lens = ExitHead.identity(e, states[e].shape[-1], head.weight)
            for name, h in (("lens", lens), ("fitted", head)):
                logits = h.logits(parts, states[e])[:, :-1].float()
                stats[f"agree_{name}"] += (logits.argmax(-1) == full).double().sum().item()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
                stats[f"nll_{name}"] += nll.mean(1).sum().item()  # per-window mean, as the fixtures README
        n_tok, n_win = windows.shape[0] * (windows.shape[1] - 1), windows.shape[0]
        out[e] = {"agreement_lens": stats["agree_lens"] / n_tok, "agreement_fitted": stats["agree_fitted"] / n_tok,
                  "perplexity_lens": math.exp(stats["nll_lens"] / n_win),
                  "perplexity_fitted": math.exp(stats["nll_fitted"] / n_win)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=WINDOW, help="tokens per window (smaller only for smoke runs)")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--max-perplexity-increase", type=float, default=0.02,
                        help="the perplexity budget of the 'cost' and 'max-skip' cascades (0.02: +2 %%)")
    parser.add_argument("--rounds", type=int, default=3, help="recalibrate's rounds on the running cascade")
    parser.add_argument("--frontier", default="0.98:0.05,0.95:0.1,0.9:none",
                        help="further budgets min_agreement:max_perplexity_increase (none: no perplexity bound), each "
                             "re-set on the running cascade from the max-skip plan's gates: where the skip grows")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "early_exit_cascade.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fixtures = fixtures_dir()
    model, tokenizer = load_model(fixtures, "tiny-llama"), load_tokenizer(fixtures)
    parts = decoder_parts(model)
    train = spread_windows(fixtures, tokenizer, "train.txt", args.calib, args.window)
    val = corpus_windows(fixtures, tokenizer, "validation.txt", args.windows, args.window)
    held = max(1, args.calib // 4)
    exits = exit_quality(model, fit_exit_heads(model, train[:-held]), val)
    for e, q in exits.items():
        print(f"exit {e}: agreement lens {q['agreement_lens']:.3f} fitted {q['agreement_fitted']:.3f}; perplexity "
              f"lens {q['perplexity_lens']:.1f} fitted {q['perplexity_fitted']:.1f}", file=sys.stderr)

    t = time.perf_counter()
    full = evaluate(model, None, val)
    full["perplexity_one_pass"] = perplexity(model, val, batch=4)  # the same number in one forward per window
    print(f"full model, token by token: perplexity {full['perplexity']:.3f} ({time.perf_counter() - t:.0f} s)",
          file=sys.stderr)
    costs = cascade_costs(model)
    layers_only = CascadeCosts(1.0, 0.0, 0.0, 0.0, 0.0, 0.0, parts.num_layers)
    cascades, plans = {}, {}
    t = time.perf_counter()
    budget = args.max_perplexity_increase
    teacher = calibrate_cascade(model, train, min_agreement=args.min_agreement, features="logits", costs=layers_only,
                                max_perplexity_increase=budget)
    calibrate_s = time.perf_counter() - t
    held_rows = split_calibration(train)[1]

    def budget_point(agreement: float, ppl: float | None):
        return lambda: recalibrate(model, dataclasses.replace(teacher, min_agreement=agreement,
                                                              max_perplexity_increase=ppl), held_rows,
                                   rounds=args.rounds)

    frontier = [(float(a), None if p == "none" else float(p))
                for a, p in (x.split(":") for x in args.frontier.split(",") if x)]
    for name, calibrate in (
            ("cost", lambda: calibrate_on_cascade(model, train, min_agreement=args.min_agreement,
                                                  rounds=args.rounds, max_perplexity_increase=budget)),
            ("max-skip-teacher-forced", lambda: teacher),
            ("max-skip", lambda: recalibrate(model, teacher, held_rows, rounds=args.rounds)),
            ("max-skip-agreement-only", budget_point(args.min_agreement, None)),
            *((f"max-skip {a}/{'none' if p is None else p}", budget_point(a, p)) for a, p in frontier)):
        t = time.perf_counter()
        plan = plans[name] = calibrate()
        row = {"min_agreement": plan.min_agreement, "max_perplexity_increase": plan.max_perplexity_increase,
               "temperatures": plan.temperatures, "exits": plan.exits, "features": plan.features,
               "thresholds": {e: g.threshold for e, g in plan.gates.items()}, "dropped": plan.dropped,
               "declined": plan.declined, "held_back": plan.held_back, "predicted": plan.predicted,
               "fill_maps": len(plan.fill_maps), "calibrate_s": time.perf_counter() - t + (
                   calibrate_s if name.startswith("max-skip") else 0.0)}
        if name.startswith("max-skip"):  # its "predicted" counted layers, not seconds
            row["predicted"] = {"note": "optimised for layer count; see held_back.skip_fraction"}
        if not plan.declined:
            v = evaluate(model, plan, val)
            v["perplexity_ratio"] = v["perplexity"] / full["perplexity"]
            row["validation"] = v
            if name == "max-skip-teacher-forced":  # the skipped layers' K/V from the exit state itself (CALM)
                ve = evaluate(model, dataclasses.replace(plan, fill_maps={}), val)
                ve["perplexity_ratio"] = ve["perplexity"] / full["perplexity"]
                row["validation_fill_exit"] = ve
                print(f"  fill from the exit state: agreement {ve['agreement']:.4f} perplexity {ve['perplexity']:.3f} "
                      f"({100 * (ve['perplexity_ratio'] - 1):+.2f} %) skip {ve['skip_fraction']:.3f}", file=sys.stderr)
            print(f"cascade {name}: exits {plan.exits} ({plan.features} gates) skip {v['skip_fraction']:.3f} "
                  f"agreement {v['agreement']:.4f} perplexity {v['perplexity']:.3f} "
                  f"({100 * (v['perplexity_ratio'] - 1):+.2f} %), exits {v['exits']}", file=sys.stderr)
        else:
            print(f"cascade {name}: {plan.declined}", file=sys.stderr)
        cascades[name] = row

    decode = None
    plan = plans["cost"]
    if not plan.declined:
        prompts = [val[i: i + 1, :24] for i in range(args.prompts)]

        def timed(fn):
            times, out = [], None
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t)
            return out, statistics.median(times)

        kw = {"max_new_tokens": args.new_tokens, "do_sample": False}
        plain = [timed(lambda p=p: model.generate(p, attention_mask=torch.ones_like(p), **kw)) for p in prompts]
        casc = [timed(lambda p=p: cascade_generate(model, p, plan=plan, return_stats=True, **kw)) for p in prompts]
        n_new = sum(o.shape[1] - p.shape[1] for (o, _), p in zip(plain, prompts))
        plain_tps = n_new / sum(t for _, t in plain)
        casc_tps = sum(o[0].shape[1] - p.shape[1] for (o, _), p in zip(casc, prompts)) / sum(t for _, t in casc)
        skipped = sum(o[1]["layers_skipped"] for (o, _) in casc)
        decode = {"plain_tokens_per_s": plain_tps, "cascade_tokens_per_s": casc_tps, "speedup": casc_tps / plain_tps,
                  "predicted_speedup": plan.predicted["speedup"],
                  "skip_fraction": skipped / max(sum(o[1]["tokens"] for (o, _) in casc) * parts.num_layers, 1),
                  "same_tokens_share": sum((o[0] == r).double().mean().item() for (o, _), (r, _) in zip(casc, plain))
                  / len(prompts)}
        print(f"decode: cascade {casc_tps:.1f} tok/s vs plain {plain_tps:.1f} ({decode['speedup']:.2f}x, predicted "
              f"{decode['predicted_speedup']:.2f}x)", file=sys.stderr)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = {"device": device_name(), "commit": commit, "threads": args.threads,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "setup": {"calibration": f"train.txt, {args.calib} x {args.window} (heads and gates on the first "
                                    f"{args.calib - held}, thresholds on the last {held})",
                     "validation": f"{args.windows} x {args.window}, token by token with the cascade's own KV cache",
                     "rounds": args.rounds, "prompts": args.prompts, "new_tokens": args.new_tokens,
                     "repeats": args.repeats,
                     "lowering": "eager (no torch.compile)", "costs_s": costs.__dict__},
           "exits": exits, "full_perplexity": full["perplexity"],
           "full_perplexity_one_pass": full["perplexity_one_pass"], "cascades": cascades, "decode": decode}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
