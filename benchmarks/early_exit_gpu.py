"""Self-speculative decoding's step costs on a 7B-shaped model with random weights (issue 16, GPU part): `main`.

Random weights give no real acceptance, so this measures what the cost model needs and predicts from it:

1. The parts' times inside the decode loops (`speculative.measure_step_costs`, CUDA-synchronised perf_counter) at
   exit E = `--exit-layer` (default L / 2), beside the roofline's (`speculative.step_costs`, the device's `HARDWARE`
   row): one layer at 1 … 9 rows, the LM head, the exit head, the host work per slice of layers, generate's step.
2. The draft step (layers < E at one row + the exit head) and the verify step (layers ≥ E at k + 1 rows + the LM
   head) for k = 1 … 4: measured (from 1.) vs the roofline's prediction.
3. One measured self-speculative run (`--new-tokens` tokens at E, k = 2, identity head) against the prediction from
   the measured parts at its own tokens per verify step, and plain `generate` against its prediction.
4. The predicted speedup at acceptance α = 0.6 and 0.8 (i.i.d. drafts: tokens per step (1 − α^(k+1)) / (1 − α))
   for every E in `--exits` and k = 1 … 8, from the roofline parts and from the measured ones; the best of each.

Model: `LlamaForCausalLM`, hidden 4096, intermediate 11008, 32 layers, 32 heads (no GQA), vocab 32000 (Llama-2-7B's
shape, 6.7 B parameters), random weights (seeded), bf16, sdpa, eager modules (`--lowering llmcompress` compiles each
layer, the norm and the LM head with the backend as benchmarks/early_exit.py does). `--small`: hidden 256,
intermediate 688, 4 layers, 4 heads, vocab 1024, for a CPU smoke run.

JSON (`--out`, default `benchmarks/results/early_exit_gpu.json`): {device, versions, commit, model, setup,
step_costs: {roofline, measured}, steps: [{exit_layer, draft_len, draft_s, verify_s, predicted_draft_s,
predicted_verify_s}], run: {exit_layer, draft_len, tokens_per_step, tokens_per_s, predicted_tokens_per_s,
prediction_error}, plain: {tokens_per_s, predicted_tokens_per_s_roofline, predicted_tokens_per_s_measured},
speedup_at: {"0.6" | "0.8": {roofline: {best: [E, k, speedup], table}, measured: {...}}}}.

    python benchmarks/early_exit_gpu.py                # on a GPU (~3-4 min: building the 7B model dominates)
    python benchmarks/early_exit_gpu.py --small        # CPU smoke (~1 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from llmcompress.cost import decode_step
from llmcompress.cost.device_profile import device_name
from llmcompress.exit_heads import ExitHead, decoder_parts
from llmcompress.speculative import _speculate, measure_step_costs, step_costs

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 1024},
}
ALPHAS = (0.6, 0.8)


def build(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = None  # every call makes all its tokens
    return model.eval().requires_grad_(False)


def tokens_per_step_at(alpha: float, k: int) -> float:
    """Expected tokens per verify step when each draft is kept with probability α independently."""
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--exit-layer", type=int, default=None)
    parser.add_argument("--exits", default=None, help="comma-separated E for the α table (default L/4, L/2, 3L/4)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lowering", choices=("eager", "llmcompress"), default="eager")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "early_exit_gpu.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # on a shared CPU, idle OpenMP workers spin and stretch every part
    shape = "small" if args.small else "7b"
    t = time.perf_counter()
    model = build(shape, device, dtype)
    log(f"built {shape} on {device} in {time.perf_counter() - t:.0f} s")
    parts = decoder_parts(model)
    n = parts.num_layers
    if args.lowering != "eager":
        for module in [*parts.layers, parts.norm, parts.lm_head]:
            module.forward = torch.compile(module.forward, backend=args.lowering, dynamic=True)
    e = args.exit_layer or n // 2
    exits = [int(x) for x in args.exits.split(",")] if args.exits else sorted({max(1, n // 4), n // 2, 3 * n // 4})
    head = ExitHead.identity(e, parts.lm_head.weight.shape[1], parts.lm_head.weight)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(parts.lm_head.weight.shape[0], (1, 32), generator=g).to(device)
    stats = {"drafted": 0, "accepted": 0, "verify_steps": 0}
    _speculate(model, parts, head, prompt, 8, 2, stats)  # warm-up (compiles with --lowering llmcompress)
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)

    roofline = step_costs(model)
    measured = measure_step_costs(model, head)
    log("measured (ms): " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in measured.items() if isinstance(v, float)))
    log("roofline (ms): " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in roofline.items() if isinstance(v, float)))

    steps = []
    for k in range(1, 5):
        row = {"exit_layer": e, "draft_len": k,
               "draft_s": e * measured["layer"] + measured["run_overhead"] + measured["exit_head"],
               "verify_s": (n - e) * measured["layer_at_rows"][k + 1] + measured["run_overhead"]
               + measured["lm_head_at_rows"][k + 1],
               "predicted_draft_s": e * roofline["layer"] + roofline["exit_head"],
               "predicted_verify_s": (n - e) * roofline["layer"] + roofline["lm_head"]}
        steps.append(row)
        log(f"E={e} k={k}: draft step {row['draft_s'] * 1e3:.3f} ms (roofline {row['predicted_draft_s'] * 1e3:.3f}),"
            f" verify step {row['verify_s'] * 1e3:.3f} ms (roofline {row['predicted_verify_s'] * 1e3:.3f})")

    def clocked(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # a long run less a short one: the difference leaves the prefill (32 prompt tokens through every layer) out
    runs = []
    for tokens in (8, 8 + args.new_tokens):
        stats = {"drafted": 0, "accepted": 0, "verify_steps": 0}
        runs.append((clocked(lambda t=tokens, st=stats: _speculate(model, parts, head, prompt, t, 2, st)), stats))
    (short_s, short), (long_s, long) = runs
    steps_run = long["verify_steps"] - short["verify_steps"]
    tps = args.new_tokens / max(steps_run, 1)
    spec_predicted = decode_step.predicted_tokens_per_s(measured, e, 2, tps)
    measured_tps = args.new_tokens / (long_s - short_s)
    run = {"exit_layer": e, "draft_len": 2, **long, "tokens_per_step": tps, "tokens_per_s": measured_tps,
           "predicted_tokens_per_s": spec_predicted, "prediction_error": measured_tps / spec_predicted - 1}
    stats = long
    log(f"run E={e} k=2: {run['tokens_per_s']:.1f} tok/s, predicted {spec_predicted:.1f} "
        f"({run['prediction_error']:+.1%}; acceptance {stats['accepted']}/{stats['drafted']})")
    plain_s = [clocked(lambda t=tokens: model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                       max_new_tokens=t, do_sample=False))
               for tokens in (8, 8 + args.new_tokens)]
    plain = {"tokens_per_s": args.new_tokens / (plain_s[1] - plain_s[0]),
             "predicted_tokens_per_s_measured": decode_step.predicted_tokens_per_s(measured),
             "predicted_tokens_per_s_roofline": decode_step.predicted_tokens_per_s(roofline)}
    log(f"plain: {plain['tokens_per_s']:.1f} tok/s, predicted {plain['predicted_tokens_per_s_measured']:.1f} "
        f"(measured parts), {plain['predicted_tokens_per_s_roofline']:.1f} (roofline)")

    speedup_at = {}
    for alpha in ALPHAS:
        entry = {}
        for name, costs in (("roofline", roofline), ("measured", measured)):
            table = {f"{ee}:{k}": decode_step.predicted_speedup(tokens_per_step_at(alpha, k), ee, k, costs)
                     for ee in exits for k in range(1, 9)}
            best = max(table, key=table.get)
            entry[name] = {"best": [*map(int, best.split(":")), table[best]], "table": table}
        speedup_at[str(alpha)] = entry
        log(f"alpha {alpha}: best predicted speedup roofline {entry['roofline']['best']}, "
            f"measured parts {entry['measured']['best']}")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = {"device": device_name(), "commit": commit,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "model": {"shape": shape, **SHAPES[shape], "dtype": str(dtype), "parameters": sum(
               p.numel() for p in model.parameters())},
           "setup": {"exit_layer": e, "exits": exits, "new_tokens": args.new_tokens, "prompt_tokens": 32,
                     "lowering": args.lowering, "head": "identity (logit lens): random weights have no acceptance"},
           "step_costs": {"roofline": roofline, "measured": measured}, "steps": steps, "run": run, "plain": plain,
           "speedup_at": speedup_at}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
