"""Perplexity of the trained fixtures under each quantization recipe, beside the dense model, in one run: `main`.

The fixtures README's method: float32 weights upcast from the stored bf16, non-overlapping 512-token windows of
`pydoc-corpus/validation.txt`, loss averaged over the 511 predicted positions of each window, perplexity = exp of the
mean window loss. Calibrated recipes calibrate on `--calib-samples` windows of 512 tokens from the start of
`train.txt` (never the validation text). Each recipe compiles a fresh copy of the model with
`torch.compile(backend="llmcompress", options={"recipe": R, "lowering": "eager", ...})`; the whole validation set
is evaluated as batches of `--batch` windows through that compiled model (one static graph: the window count is a
multiple of the batch, the remainder windows are dropped and the count recorded).

Targets (issue "quantize-linear"), relative to dense: w8a16 <= +0.1 %; w4a16-awq and w4a16-gptq <= +1.0 %
(round-to-nearest w4a16 is about +2 %); w8a8-smoothquant <= +1 %. tiny-mixtral with w4a16 is reported.

JSON (`--out`, default `benchmarks/results/quantized_quality.json`): {"device", "versions", "method", "windows",
"calibration" {source, samples, seq_len}, "results": [{model, recipe, perplexity, dense_perplexity, delta_pct,
target_pct (null when none), met (bool or null), quantized_layers, seconds (compile + calibration + eval)}]}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

from llmcompress.testing.fixtures import WINDOW, corpus_windows, fixtures_dir, load_model, load_tokenizer, perplexity

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = fixtures_dir()
TARGETS = {"w8a16": 0.1, "w4a16-awq": 1.0, "w4a16-gptq": 1.0, "w8a8-smoothquant": 1.0}
DEFAULT_RUNS = ["tiny-llama:dense", "tiny-llama:w8a16", "tiny-llama:w4a16", "tiny-llama:w4a16-awq",
                "tiny-llama:w4a16-gptq", "tiny-llama:w8a8-smoothquant", "tiny-mixtral:dense", "tiny-mixtral:w4a16",
                "tiny-mixtral:w4a16-gptq", "tiny-mixtral:w4a16-awq"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="model:recipe pairs (recipe 'dense' = no compile)")
    p.add_argument("--windows", type=int, default=None, help="validation windows (default: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantized_quality.json")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(args.fixtures)
    windows = corpus_windows(args.fixtures, tokenizer, "validation.txt")[: args.windows]
    windows = windows[: len(windows) // args.batch * args.batch]
    calibration = corpus_windows(args.fixtures, tokenizer, "train.txt", args.calib_samples)
    print(f"{len(windows)} validation windows of {WINDOW}; calibration {tuple(calibration.shape)} from train.txt",
          file=sys.stderr)

    dense: dict[str, float] = {}
    results = []
    for run in args.runs:
        name, recipe = run.split(":")
        t0 = time.perf_counter()
        model = load_model(args.fixtures, name)
        layers = None
        if recipe == "dense":
            ppl = perplexity(model, windows, args.batch)
            dense[name] = ppl
        else:
            torch._dynamo.reset()
            report = args.out.with_suffix(f".{name}.{recipe}.report.json")
            options = {"recipe": recipe, "lowering": "eager", "report": str(report), "calibration": calibration,
                       "calibration_samples": len(calibration), "calibration_seq_len": WINDOW}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                compiled = torch.compile(model, backend="llmcompress", options=options)
                ppl = perplexity(compiled, windows, args.batch)
            rep = json.loads(report.read_text())
            report.unlink()
            layers = {k: v for g in rep["graphs"] for pr in g.get("passes", []) if pr["name"] == "quantize-linear"
                      for k, v in pr["stats"].items()}
        if name not in dense:
            dense[name] = perplexity(load_model(args.fixtures, name), windows, args.batch)
        delta = 100 * (ppl / dense[name] - 1)
        target = TARGETS.get(recipe) if name == "tiny-llama" else None
        row = {"model": name, "recipe": recipe, "perplexity": ppl, "dense_perplexity": dense[name],
               "delta_pct": delta, "target_pct": target, "met": None if target is None else delta <= target,
               "quantized_layers": layers, "seconds": round(time.perf_counter() - t0, 1)}
        results.append(row)
        print(f"{name:13s} {recipe:17s} ppl {ppl:8.4f}  {delta:+7.3f} %  "
              f"{'' if target is None else ('target <= +%.1f %%: %s' % (target, 'met' if row['met'] else 'MISSED'))}"
              f"  ({row['seconds']} s)", file=sys.stderr)

    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "method": "fixtures README: float32, non-overlapping 512-token windows of validation.txt, mean loss over "
                     "511 predicted positions per window",
           "windows": len(windows),
           "calibration": {"source": "train.txt (first windows)", "samples": len(calibration), "seq_len": WINDOW},
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
