"""Quantized experts through the fused MoE ops (issue 15): tiny-mixtral's perplexity under `w4a16-gptq` (and `w8a16`,
`w4a16-awq`) with the experts quantized as grouped matmuls (today's recipe) and as `llmcompress::moe_experts_w4a16` /
`moe_experts_w8a16` behind `fuse-moe`, beside the dense model, in one run: `main`. AWQ's fused experts carry their
per-expert 1/s into the op (`act_gate_up`, `act_down`); the grouped path's act_scale does the same math.

Target: int4 experts through moe_experts (GPTQ) equal to today's `w4a16-gptq` result within noise (+1.34 %,
benchmarks/results/quantized_quality.json).

The fixtures README's method (as `quantized_quality.py`): float32 weights upcast from the stored bf16, non-overlapping
512-token windows of `validation.txt`, mean loss over the 511 predicted positions, perplexity = exp of the mean window
loss; calibration on `--calib-samples` windows from the start of `train.txt`; lowering `eager`.

Forcing the rewrite on a CPU: the cost model declines `fuse-moe` there (its CPU path loops over the experts on the
host, 1.25x slower at decode, benchmarks/moe_cpu.py), so the fused runs use `fuse-moe` option `objective: always`,
which fuses every block it can whatever the price; the ops then run their CPU path, the PyTorch reference (the
kernels' oracle), on the same quantized tensors the Triton kernels read on a GPU. Each fused run checks the compiled
graph really holds the quantized fused ops (`fused_experts_ops` in the JSON) and no grouped quantized matmul.

JSON (`--out`, default `benchmarks/results/moe_quant_quality.json`): {device, versions, git, method, windows,
calibration {source, samples, seq_len}, forced_by, results: [{run, recipe, fuse_moe, perplexity, dense_perplexity,
delta_pct, fused_experts_ops, grouped_ops, quantized_layers, seconds}], comparison {w4a16-gptq: {grouped_delta_pct,
fused_delta_pct, difference_pct_points}, w8a16 ..., w4a16-awq ...}, complete (false while the runs go on: the file is rewritten after each)}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (recipe, fuse-moe in the pipeline)
RUNS = {"dense": (None, False), "w4a16-gptq": ("w4a16-gptq", False), "w4a16-gptq + fuse-moe": ("w4a16-gptq", True),
        "w8a16": ("w8a16", False), "w8a16 + fuse-moe": ("w8a16", True),
        "w4a16-awq": ("w4a16-awq", False), "w4a16-awq + fuse-moe": ("w4a16-awq", True)}
FORCED = {"fuse-moe": {"objective": "always"}}


def _git() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _passes(recipe: str, fuse: bool) -> dict:
    """The recipe's passes, with fuse-moe (forced) before quantize-linear when `fuse`."""
    from llmcompress.recipes import load_recipe

    passes = {s.name: dict(s.options) for s in load_recipe(recipe).passes}
    return {**passes, **FORCED} if fuse else passes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", type=Path, default=None, help="default: llmcompress.testing.fixtures.fixtures_dir()")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--windows", type=int, default=None, help="validation windows (default: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--dense-perplexity", type=float, default=None,
                   help="the dense model's perplexity on the same windows, measured earlier (skips that run)")
    p.add_argument("--grouped-from", type=Path, default=None,
                   help="quantized_quality.py's JSON: take the grouped (today's) rows of tiny-mixtral from it when "
                        "this run does not measure them (same method, windows and calibration)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "moe_quant_quality.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    from llmcompress.testing.fixtures import (
        WINDOW,
        corpus_windows,
        fixtures_dir,
        load_model,
        load_tokenizer,
        perplexity,
    )

    fixtures = args.fixtures or fixtures_dir()
    tokenizer = load_tokenizer(fixtures)
    windows = corpus_windows(fixtures, tokenizer, "validation.txt")[: args.windows]
    windows = windows[: len(windows) // args.batch * args.batch]
    calibration = corpus_windows(fixtures, tokenizer, "train.txt", args.calib_samples)
    print(f"{len(windows)} validation windows of {WINDOW}; calibration {tuple(calibration.shape)}", file=sys.stderr)
    ops = torch.ops.llmcompress
    fused_ops = {str(ops.moe_experts_w4a16.default), str(ops.moe_experts_w8a16.default)}
    grouped_ops = {str(ops.grouped_linear_w4a16.default), str(ops.grouped_linear_w8a16.default)}

    dense_ppl = args.dense_perplexity
    results: list[dict] = []
    earlier = {}
    if args.grouped_from is not None:
        doc = json.loads(args.grouped_from.read_text())
        if doc["windows"] != len(windows) or doc["calibration"]["samples"] != len(calibration):
            raise SystemExit(f"{args.grouped_from}: {doc['windows']} windows / {doc['calibration']['samples']} "
                             f"calibration samples, this run {len(windows)} / {len(calibration)}")
        earlier = {r["recipe"]: {**r, "run": r["recipe"], "source": str(args.grouped_from)} for r in doc["results"]
                   if r["model"] == "tiny-mixtral"}

    def write(complete: bool) -> None:
        by_run = {**earlier, **{r["run"]: r for r in results}}
        comparison = {}
        for recipe in ("w4a16-gptq", "w8a16", "w4a16-awq"):
            if recipe in by_run and f"{recipe} + fuse-moe" in by_run:
                g, f = by_run[recipe]["delta_pct"], by_run[f"{recipe} + fuse-moe"]["delta_pct"]
                comparison[recipe] = {"grouped_delta_pct": g, "fused_delta_pct": f, "difference_pct_points": f - g,
                                      "grouped_source": by_run[recipe].get("source", "this run")}
        out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version()},
               "git": _git(),
               "method": "fixtures README: float32, non-overlapping 512-token windows of validation.txt, mean loss over "
                         "511 predicted positions per window",
               "windows": len(windows),
               "calibration": {"source": "train.txt (first windows)", "samples": len(calibration), "seq_len": WINDOW},
               "forced_by": "fuse-moe objective: always (the cost model declines it on a CPU); the fused ops run their "
                            "PyTorch reference on the CPU",
               "complete": complete, "results": results, "comparison": comparison}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")

    for run in args.runs:
        recipe, fuse = RUNS[run]
        t0 = time.perf_counter()
        model = load_model(fixtures, "tiny-mixtral")
        row = {"run": run, "recipe": recipe or "dense", "fuse_moe": FORCED["fuse-moe"] if fuse else None}
        if recipe is None:
            ppl = dense_ppl = perplexity(model, windows, args.batch)
        else:
            from llmcompress.backend import make_backend

            torch._dynamo.reset()
            targets: list[str] = []
            report = args.out.with_suffix(f".{run.replace(' ', '')}.report.json")
            options = {"passes": _passes(recipe, fuse), "lowering": "eager", "report": str(report),
                       "calibration": calibration, "calibration_samples": len(calibration),
                       "calibration_seq_len": WINDOW}
            backend = make_backend(on_graph=lambda before, after, ctx, seen=targets: seen.extend(
                str(n.target) for n in after.graph.nodes if n.op == "call_function"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                ppl = perplexity(torch.compile(model, backend=backend, options=options), windows, args.batch)
            rep = json.loads(report.read_text())
            report.unlink()
            row["quantized_layers"] = {k: v for g in rep["graphs"] for pr in g.get("passes", [])
                                       if pr["name"] == "quantize-linear" for k, v in pr["stats"].items()}
            row["fused_experts_ops"] = sum(t in fused_ops for t in targets)
            row["grouped_ops"] = sum(t in grouped_ops for t in targets)
            if fuse and (row["fused_experts_ops"] == 0 or row["grouped_ops"]):
                raise SystemExit(f"{run}: the compiled graph holds {row['fused_experts_ops']} fused quantized "
                                 f"experts ops and {row['grouped_ops']} grouped ones: the fused path did not run")
        if dense_ppl is None:
            dense_ppl = perplexity(load_model(fixtures, "tiny-mixtral"), windows, args.batch)
        row.update(perplexity=ppl, dense_perplexity=dense_ppl, delta_pct=100 * (ppl / dense_ppl - 1),
                   seconds=round(time.perf_counter() - t0, 1))
        results.append(row)
        print(f"{run:22s} ppl {ppl:8.4f}  {row['delta_pct']:+7.3f} %  ({row['seconds']} s)", file=sys.stderr)
        write(False)  # after every run: a run cut short keeps what it measured

    write(True)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
