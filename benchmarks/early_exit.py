"""Early exit on the trained tiny-llama fixture (issue 16), in one run: `main`.

1. Top-1 agreement with the full model after each layer, logit lens vs fitted translation (`exit_heads`): fitted by
   ridge least squares on `--calib` × 512 tokens of train.txt (default 24, the issue's), measured on `--windows`
   non-overlapping 512-token windows of validation.txt (default 16).
2. Acceptance per exit E for k = 1..4, teacher-forced on those validation windows (the share of drafts a verify keeps
   if the context is the text itself), and the cost model's predicted speedup (`speculative.predicted_speedup`).
3. Measured decoding, eager (no torch.compile): `--prompts` prompts (24 tokens from the start of validation windows)
   × `--new-tokens` greedy tokens, plain `generate(do_sample=False)` vs self-speculative at each `--configs` E:k with
   the heads of 1.; token identity, measured acceptance, tokens/s (median of `--repeats`) and speedup; and what
   "auto" chooses (`plan_speculation` on 8 × 256 calibration tokens).

JSON (`--out`, default `benchmarks/results/early_exit.json`): {"device", "versions", "commit", "threads", "setup",
"agreement": {E: {lens, fitted}}, "teacher_forced": [{exit_layer, draft_len, acceptance, tokens_per_step,
predicted_speedup}], "decode": [{exit_layer, draft_len, identical, drafted, accepted, acceptance_rate,
tokens_per_s, plain_tokens_per_s, speedup, predicted_speedup}], "auto": {exit_layer, draft_len, declined}}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from llmcompress.cost.device_profile import device_name
from llmcompress.exit_heads import decoder_parts, exit_agreement, fit_exit_heads, layer_states
from llmcompress.speculative import _speculate, plan_speculation, predicted_speedup, step_costs, tokens_per_step
from llmcompress.testing.fixtures import corpus_windows, fixtures_dir, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=24)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default="3:1,3:2,5:1,5:2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "early_exit.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fixtures = fixtures_dir()
    model, tokenizer = load_model(fixtures, "tiny-llama"), load_tokenizer(fixtures)
    parts = decoder_parts(model)
    train = corpus_windows(fixtures, tokenizer, "train.txt", args.calib)
    val = corpus_windows(fixtures, tokenizer, "validation.txt", args.windows)
    heads = fit_exit_heads(model, train)
    agreement = exit_agreement(model, heads, val)
    for e, a in agreement.items():
        print(f"exit {e}: agreement lens {a['lens']:.3f} fitted {a['fitted']:.3f}", file=sys.stderr)

    costs = step_costs(model)
    states = layer_states(model, val)
    with torch.no_grad():
        full = parts.lm_head(parts.norm(states[-1])).argmax(-1)
        agree = {e: h.logits(parts, states[e]).argmax(-1) == full for e, h in heads.items()}
    del states
    teacher = []
    for e in heads:
        for k in range(1, 5):
            tps = tokens_per_step(agree[e], k)
            teacher.append({"exit_layer": e, "draft_len": k, "acceptance": (tps - 1) / k, "tokens_per_step": tps,
                            "predicted_speedup": predicted_speedup(tps, e, k, costs)})
    for row in teacher:
        print(f"E={row['exit_layer']} k={row['draft_len']}: acceptance {row['acceptance']:.3f} "
              f"predicted {row['predicted_speedup']:.2f}x", file=sys.stderr)

    prompts = [val[i: i + 1, :24] for i in range(args.prompts)]

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return out, statistics.median(times)

    plain = [timed(lambda p=p: model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=args.new_tokens,
                                              do_sample=False)) for p in prompts]
    plain_tps = sum(o.shape[1] - p.shape[1] for (o, _), p in zip(plain, prompts)) / sum(t for _, t in plain)
    decode = []
    for config in args.configs.split(","):
        e, k = map(int, config.split(":"))
        stats = {"drafted": 0, "accepted": 0, "verify_steps": 0}
        identical, seconds, tokens = True, 0.0, 0
        for p, (ref, _) in zip(prompts, plain):
            run_stats = {}

            def spec(p=p, run_stats=run_stats, e=e, k=k):
                run_stats.clear()
                run_stats.update(drafted=0, accepted=0, verify_steps=0)
                return _speculate(model, parts, heads[e], p, args.new_tokens, k, run_stats)

            ids, t = timed(spec)
            identical &= torch.equal(ids, ref)
            seconds += t
            tokens += ids.shape[1] - p.shape[1]
            for key in stats:
                stats[key] += run_stats[key]
        tps = tokens / seconds
        row = {"exit_layer": e, "draft_len": k, "identical": identical, **stats,
               "acceptance_rate": stats["accepted"] / max(stats["drafted"], 1), "tokens_per_s": tps,
               "plain_tokens_per_s": plain_tps, "speedup": tps / plain_tps,
               "predicted_speedup": next(r["predicted_speedup"] for r in teacher
                                         if (r["exit_layer"], r["draft_len"]) == (e, k))}
        decode.append(row)
        print(f"decode E={e} k={k}: identical {identical} acceptance {row['acceptance_rate']:.3f} "
              f"{tps:.1f} tok/s vs plain {plain_tps:.1f} ({row['speedup']:.2f}x, predicted "
              f"{row['predicted_speedup']:.2f}x)", file=sys.stderr)
    plan = plan_speculation(model, train[:8, :256])
    print(f"auto: {plan.declined or f'exit {plan.exit_layer}, k={plan.draft_len}'}", file=sys.stderr)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = {"device": device_name(), "commit": commit, "threads": args.threads,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "setup": {"calibration": f"train.txt, {args.calib} x 512", "validation": f"{args.windows} x 512",
                     "prompts": args.prompts, "prompt_tokens": 24, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "lowering": "eager (no torch.compile)", "step_costs_s": costs},
           "agreement": agreement, "teacher_forced": teacher, "decode": decode,
           "auto": {"exit_layer": plan.exit_layer, "draft_len": plan.draft_len, "declined": plan.declined}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
