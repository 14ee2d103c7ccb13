"""Calibration cost: compile + first call of the trained tiny-llama fixture under w4a16 (round to nearest),
w4a16-gptq and w4a16-awq on the same calibration tokens, in one process, so the AWQ / GPTQ ratio is measured under
the same machine load (the issue's target: AWQ <= 2x GPTQ).

Each run loads a fresh float32 copy of `../shared/fixtures/tiny-llama` (untimed; a fresh model also means an empty
derived-weight cache), then times `torch.compile(model, backend="llmcompress", options={"recipe": R, "lowering":
"eager", "calibration": ids, "calibration_samples": S, "calibration_seq_len": L})(prompt)`: Dynamo capture, the
passes (calibration included), lowering and the call. ids: the first S x L tokens of `pydoc-corpus/train.txt`
(default 32 x 512); prompt: the first L-token window of `validation.txt`, batch 1 (a static (1, L) graph, so
calibration runs S chunks of one window). Runs alternate between recipes (`--repeats` rounds) and each recipe's
median is reported. The quality proxy: perplexity of each compiled model on `--quality-windows` 512-token windows of
`validation.txt` (the fixtures README's method; dense too), from the first round's compiled models; a speed-up that
changes a calibrated method's numbers shows there.

JSON (`--out`, default `benchmarks/results/calibration_time_tiny_cpu.json`): {"device", "versions", "threads",
"calibration" {samples, seq_len}, "runs" {recipe: [seconds per round]}, "pass_s" {recipe: [quantize-linear's own
seconds per round]}, "load_before" {recipe: [the 1-minute load average before each run: other processes on
the machine]}, "median_s" {recipe: s}, "ratio_awq_over_gptq", "target" {"awq_over_gptq_max": 2.0, "met"},
"perplexity" {dense and each recipe, on the quality windows}, "quantized" {recipe: quantize-linear's per-method
layer counts}, "created", "command"}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

from llmcompress.testing.fixtures import corpus_windows, fixtures_dir, load_model, load_tokenizer, perplexity

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = fixtures_dir()
RECIPES = ("w4a16", "w4a16-gptq", "w4a16-awq")
TARGET_RATIO = 2.0


def compile_once(fixtures: Path, recipe: str, calibration: torch.Tensor, prompt: torch.Tensor, report: Path
                 ) -> tuple[float, float, dict, torch.nn.Module]:
    """(seconds of compile + first call, quantize-linear's seconds, its stats, the compiled model)."""
    model = load_model(fixtures, "tiny-llama")
    torch._dynamo.reset()
    options = {"recipe": recipe, "lowering": "eager", "report": str(report), "calibration": calibration,
               "calibration_samples": calibration.shape[0], "calibration_seq_len": calibration.shape[1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t0 = time.perf_counter()
        compiled = torch.compile(model, backend="llmcompress", options=options)
        with torch.no_grad():
            compiled(prompt)
        seconds = time.perf_counter() - t0
    rep = json.loads(report.read_text())
    records = [p for g in rep["graphs"] for p in g.get("passes", []) if p["name"] == "quantize-linear"]
    if not records or any(p["status"] == "failed" for p in records):
        raise SystemExit(f"{recipe}: quantize-linear did not run or failed: {records}")
    stats = {k: v for p in records for k, v in p["stats"].items()}
    return seconds, sum(p["time_s"] for p in records), stats, compiled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1, help="rounds over the recipes; medians are reported")
    p.add_argument("--quality-windows", type=int, default=32, help="validation windows for perplexity (0: none)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration_time_tiny_cpu.json")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(args.fixtures)
    calibration = corpus_windows(args.fixtures, tokenizer, "train.txt", args.samples, args.seq_len)
    validation = corpus_windows(args.fixtures, tokenizer, "validation.txt", max(1, args.quality_windows))
    prompt = validation[:1, : args.seq_len]

    runs: dict[str, list[float]] = {r: [] for r in args.recipes}
    pass_s: dict[str, list[float]] = {r: [] for r in args.recipes}
    load_before: dict[str, list[float]] = {r: [] for r in args.recipes}
    quantized: dict[str, dict] = {}
    ppl: dict[str, float] = {}
    if args.quality_windows:
        ppl["dense"] = perplexity(load_model(args.fixtures, "tiny-llama"), validation)
        print(f"dense perplexity {ppl['dense']:.4f} on {len(validation)} windows", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for recipe in args.recipes:
                load_before[recipe].append(round(os.getloadavg()[0], 2))
                seconds, own, stats, compiled = compile_once(args.fixtures, recipe, calibration, prompt,
                                                             Path(tmp) / f"{recipe}-{round_}.json")
                runs[recipe].append(round(seconds, 2))
                pass_s[recipe].append(round(own, 2))
                quantized[recipe] = {k: v for k, v in stats.items() if k.startswith("w4a16")}
                line = (f"round {round_}: {recipe:11s} compile + first call {seconds:7.2f} s "
                        f"(quantize-linear {own:.2f} s)")
                if round_ == 0 and args.quality_windows:
                    ppl[recipe] = perplexity(compiled, validation)
                    line += f", perplexity {ppl[recipe]:.4f}"
                print(line, file=sys.stderr)
                del compiled

    medians = {r: statistics.median(v) for r, v in runs.items()}
    ratio = medians["w4a16-awq"] / medians["w4a16-gptq"] if {"w4a16-awq", "w4a16-gptq"} <= set(medians) else None
    out = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "calibration": {"source": "train.txt (first windows)", "samples": args.samples, "seq_len": args.seq_len},
        "runs": runs, "pass_s": pass_s, "load_before": load_before, "median_s": medians,
        "ratio_awq_over_gptq": None if ratio is None else round(ratio, 3),
        "target": {"awq_over_gptq_max": TARGET_RATIO, "met": None if ratio is None else ratio <= TARGET_RATIO},
        "perplexity": {"windows": args.quality_windows, **ppl}, "quantized": quantized,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"medians: {medians}; AWQ / GPTQ = {out['ratio_awq_over_gptq']}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
