"""The early-exit cascade compiled (`early-exit` pass, recipe `early-exit-cascade`) on the trained tiny-llama
fixture against the same model compiled without it, in one run through the same backend and lowering: `main`.

Both copies run `generate` (static cache, greedy, batch 1) on `--prompts` prompts of `--prompt-len` tokens from
validation.txt windows, `--new-tokens` new tokens, `--repeats` timed runs after one warm-up (which compiles). The
cascade calibrates on `--calib` windows of train.txt (generate's prefill graph is fed; its static shape cuts them into
prompt-length chunks) at `--min-agreement` and `--max-perplexity-increase`. Reported: decode tokens/s of both (median over repeats), measured speedup
against the plan's predicted speedup (cost model), share of decoder-layer evaluations skipped (the decode graph's
run-time counts), share of generated tokens equal to plain greedy decoding, and the pass's plan (exits, held-back
agreement and skip fraction, exit heads' agreement lens vs fitted).

JSON (`--out`, default `benchmarks/results/early_exit_compiled.json`): {"device", "versions", "commit", "threads",
"setup", "plan", "decode": {plain_tokens_per_s, cascade_tokens_per_s, speedup, predicted_speedup, skip_fraction,
exits, same_tokens_share}}.
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

from llmcompress.backend import make_backend
from llmcompress.cost.device_profile import device_name
from llmcompress.passes.early_exit.split import META_KEY
from llmcompress.testing.fixtures import corpus_windows, fixtures_dir, load_model, load_tokenizer, spread_windows

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--max-perplexity-increase", default="0.02",
                        help="the pass's perplexity budget (the recipe's 0.02), or 'none'")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "early_exit_compiled.json")
    args = parser.parse_args(argv)
    ppl = None if args.max_perplexity_increase == "none" else float(args.max_perplexity_increase)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    fixtures = fixtures_dir()
    tokenizer = load_tokenizer(fixtures)
    train = spread_windows(fixtures, tokenizer, "train.txt", args.calib)
    prompts = [w[None, : args.prompt_len] for w in corpus_windows(fixtures, tokenizer, "validation.txt", args.prompts)]
    splits: list = []
    report = args.out.with_suffix(".report.json")
    models = {}
    for name, options in (("plain", {"passes": ["canonicalize"]}),
                          ("cascade", {"passes": {"canonicalize": {}, "early-exit": {
                              "min_agreement": args.min_agreement, "max_perplexity_increase": ppl}},
                              "calibration": train, "calibration_samples": args.calib,
                              "calibration_seq_len": train.shape[1], "report": str(report)})):
        model = load_model(fixtures, "tiny-llama")
        hook = (lambda before, after, ctx: splits.append(after.meta.get(META_KEY))) if name == "cascade" else None
        # dynamic=False: the second model's compile is a recompile of the same code, which Dynamo would make
        # dynamic; a dynamic prefill is fed whole 512-token calibration windows, longer than the static cache
        model.forward = torch.compile(model.forward, backend=make_backend(on_graph=hook) if hook else "llmcompress",
                                      options={"lowering": args.lowering, **options}, dynamic=False)
        models[name] = model

    kw = {"max_new_tokens": args.new_tokens, "do_sample": False, "cache_implementation": "static"}

    def run(model, p):
        with torch.no_grad():
            return model.generate(p, attention_mask=torch.ones_like(p), **kw)

    results, compile_s = {}, {}
    for name, model in models.items():
        t = time.perf_counter()
        run(model, prompts[0])  # compiles the prefill and decode graphs (and calibrates the cascade)
        compile_s[name] = time.perf_counter() - t
        print(f"{name}: warm-up (compile) {compile_s[name]:.0f} s", file=sys.stderr)
    branches = next((b for b in splits if b is not None), None)
    if branches is not None:
        branches.counts.clear()
    for name, model in models.items():
        outs, times = [], []
        for p in prompts:
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = run(model, p)
                ts.append(time.perf_counter() - t)
            outs.append(out)
            times.append(statistics.median(ts))
        n_new = sum(o.shape[1] - p.shape[1] for o, p in zip(outs, prompts))
        results[name] = (outs, n_new / sum(times))
        print(f"{name}: {results[name][1]:.1f} tokens/s", file=sys.stderr)
    data = json.loads(report.read_text()) if report.exists() else {"graphs": []}
    decisions = [d for g in data["graphs"] for p in g["passes"] if p["name"] == "early-exit" for d in p["decisions"]]
    plan = next((d for d in decisions if d["early-exit"] == "plan"), None)
    plain_tps, cascade_tps = results["plain"][1], results["cascade"][1]
    same = statistics.mean((a == b).double().mean().item() for a, b in zip(results["plain"][0], results["cascade"][0]))
    decode = {"plain_tokens_per_s": plain_tps, "cascade_tokens_per_s": cascade_tps, "speedup": cascade_tps / plain_tps,
              "predicted_speedup": (plan or {}).get("predicted", {}).get("speedup"),
              "skip_fraction": branches.skip_fraction() if branches else 0.0,
              "exits": dict(branches.counts) if branches else {}, "same_tokens_share": same,
              "decision": decisions[-1] if decisions else None}
    print(f"decode: cascade {cascade_tps:.1f} tok/s vs plain {plain_tps:.1f} ({decode['speedup']:.2f}x, predicted "
          f"{decode['predicted_speedup']}), skip {decode['skip_fraction']:.3f}, same tokens {same:.3f}",
          file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = {"device": device_name(), "commit": commit, "threads": args.threads,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "setup": {"min_agreement": args.min_agreement, "max_perplexity_increase": ppl,
                     "calibration": f"train.txt, {args.calib} x {train.shape[1]}", "prompts": args.prompts,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "lowering": args.lowering, "compile_s": compile_s},
           "plan": plan, "decode": decode}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
