"""Perplexity of tiny-mixtral with experts pruned by `moe-prune` and skipped by `fuse-moe`'s skipping options,
beside the dense model and the issue's simple rules, in one run: `main`.

The method of `sparse_quality.py`: float32 weights upcast from the stored bf16, non-overlapping 512-token windows of
`pydoc-corpus/validation.txt` (the first `--windows`, 32 as in issue 15), loss averaged over the 511 predicted
positions of each window. Calibration: `--calib-samples` windows of 512 tokens from the start of `train.txt` (issue
15: 16). Each row compiles a fresh copy of the model (`lowering: eager`).

Rows: `prune-6`, `prune-4` (moe-prune defaults: reconstruction, router refit, down projections refit) beside
`prune-*-no-down` (no down refit), `prune-*-routed-weight` (the least routed weight removed, no refit: the issue's
rule) and `prune-*-global`; `skip-budget` (fuse-moe `skip_budget`: a β per layer calibrated on the calibration loss
to `--skip-budget`) beside `skip-beta-0.2/0.3/0.5` (fuse-moe `skip_beta`, one β for every layer: the issue's rule),
both with fuse-moe's default `skip_compensate` (a skipped slot adds its weight × the expert's calibrated mean output;
`skip-*-no-compensate`: without). On a CPU fuse-moe may decline the blocks and apply the rule to the routing weights:
the same model. A skip row reports the fraction of expert evaluations (token × top-k slot) skipped on the validation
windows, measured on the dense model's routing with each layer's β from the compile report, and on the calibration
data (the pass's stats).

Targets (issue 15), relative to dense: prune-6 <= +2.5 %, prune-4 <= +20 %, skip-budget >= 20 % skipped at
<= +1.5 %. JSON (`--out`, default `benchmarks/results/moe_quality.json`): {"device", "versions", "commit", "method",
"windows", "calibration", "results": [{run, perplexity, dense_perplexity, delta_pct, target, met, experts_kept,
betas, skipped_validation, skipped_calibration, seconds}]}.
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

import torch
import transformers

from llmcompress.cost.device_profile import device_name
from llmcompress.passes.moe.skip import skip_slots
from llmcompress.testing.fixtures import WINDOW, corpus_windows, fixtures_dir, load_model, load_tokenizer, perplexity

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-mixtral"
# run -> (moe-prune options or None, fuse-moe options or None, target: ("delta", pct) or ("skip", fraction, pct))
RUNS = {
    "prune-6": ({"keep": 6}, None, ("delta", 2.5)),
    "prune-6-no-down": ({"keep": 6, "correct_down": False}, None, None),
    "prune-6-routed-weight": ({"keep": 6, "method": "routed-weight", "refit_router": False, "correct_down": False},
                              None, None),
    "prune-6-global": ({"keep": 6, "allocate": "global"}, None, None),
    "prune-4": ({"keep": 4}, None, ("delta", 20.0)),
    "prune-4-no-down": ({"keep": 4, "correct_down": False}, None, None),
    "prune-4-global": ({"keep": 4, "allocate": "global"}, None, None),
    "prune-4-routed-weight": ({"keep": 4, "method": "routed-weight", "refit_router": False, "correct_down": False},
                              None, None),
    "skip-budget": (None, {}, ("skip", 0.20, 1.5)),
    "skip-beta-0.2": (None, {"skip_beta": 0.2}, None),
    "skip-beta-0.3": (None, {"skip_beta": 0.3}, None),
    "skip-beta-0.5": (None, {"skip_beta": 0.5}, None),
    "skip-budget-no-compensate": (None, {"skip_compensate": False}, None),
    "skip-beta-0.3-no-compensate": (None, {"skip_beta": 0.3, "skip_compensate": False}, None),
}
DEFAULT_RUNS = ["dense", "prune-6", "prune-4", "skip-budget", "skip-beta-0.3"]


def _spec(run: str) -> tuple:
    """RUNS[run], or for `skip-budget=<x>` the skip-budget row at budget x."""
    if run.startswith("skip-budget="):
        return None, {"skip_budget": float(run.split("=", 1)[1])}, RUNS["skip-budget"][2]
    return RUNS[run]


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _decisions(report: dict, name: str) -> tuple[list[dict], dict]:
    for g in report["graphs"][:1]:
        for pr in g.get("passes", []):
            if pr["name"] == name:
                return pr["decisions"], pr["stats"]
    return [], {}


def skipped_on(model: torch.nn.Module, windows: torch.Tensor, betas: list[float], batch: int) -> float:
    """Fraction of expert evaluations the per-layer `betas` skip on `windows`, from the dense model's routing (the
    top-k weights its routers return)."""
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    if len(routers) != len(betas):
        raise ValueError(f"{len(routers)} routers but {len(betas)} betas")
    counts = [0, 0]

    def hook(beta):
        def f(_module, _inputs, out):
            mask = skip_slots(out[1], beta)
            counts[0] += int(mask.sum())
            counts[1] += mask.numel()
        return f

    handles = [r.register_forward_hook(hook(b)) for r, b in zip(routers, betas)]
    try:
        with torch.no_grad():
            for chunk in windows.split(batch):
                model(chunk)
    finally:
        for h in handles:
            h.remove()
    return counts[0] / counts[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", type=Path, default=fixtures_dir())
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                   help=f"dense, {', '.join(RUNS)}, skip-budget=<budget> (default: {' '.join(DEFAULT_RUNS)})")
    p.add_argument("--windows", type=int, default=32, help="validation windows (issue 15: 32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=16, help="train.txt windows of 512 (issue 15: 16)")
    p.add_argument("--skip-budget", type=float, default=0.02,
                   help="fuse-moe's skip_budget (calibration perplexity increase) for the skip-budget row")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "moe_quality.json")
    p.add_argument("--merge", type=Path, nargs="+", help="only merge the results of these JSONs (runs of this "
                   "script with the same options, e.g. rows run in parallel) into --out")
    p.add_argument("--note", help="with --merge: a note kept in the JSON (how the parts were run)")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        out = {**parts[0], "results": [r for part in parts for r in part["results"]],
               "merged_from": [{"commit": part["commit"], "runs": [r["run"] for r in part["results"]]}
                               for part in parts], "note": args.note}
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        return 0

    tokenizer = load_tokenizer(args.fixtures)
    windows = corpus_windows(args.fixtures, tokenizer, "validation.txt")[: args.windows]
    windows = windows[: len(windows) // args.batch * args.batch]
    calibration = corpus_windows(args.fixtures, tokenizer, "train.txt", args.calib_samples)
    print(f"{len(windows)} validation windows of {WINDOW}; calibration {tuple(calibration.shape)} from train.txt",
          file=sys.stderr)
    dense_model = load_model(args.fixtures, MODEL)
    dense = perplexity(dense_model, windows, args.batch)
    results = []
    for run in args.runs:
        t0 = time.perf_counter()
        row: dict = {"run": run}
        if run == "dense":
            ppl = dense
        else:
            prune, skip, target = _spec(run)
            passes: dict = {"canonicalize": {}}
            if prune is not None:
                passes["moe-prune"] = prune
            if skip is not None:  # a CPU: fuse-moe declines the blocks and skips on the routing weights (same model)
                budget_row = run.startswith("skip-budget") and "skip_budget" not in skip
                passes["fuse-moe"] = {"skip_budget": args.skip_budget, **skip} if budget_row else skip
            report_path = args.out.with_suffix(f".{run}.report.json")
            options = {"lowering": "eager", "report": str(report_path), "passes": passes, "calibration": calibration,
                       "calibration_samples": len(calibration), "calibration_seq_len": WINDOW, "strict": True}
            torch._dynamo.reset()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                compiled = torch.compile(load_model(args.fixtures, MODEL), backend="llmcompress", options=options)
                ppl = perplexity(compiled, windows, args.batch)
            report = json.loads(report_path.read_text())
            report_path.unlink()
            if prune is not None:
                decisions, _ = _decisions(report, "moe-prune")
                row["experts_kept"] = {d["layer"]: d["experts_kept"] for d in decisions}
                row["reconstruction_error"] = {d["layer"]: [d.get("reconstruction_error", 0.0),
                                                            d.get("reconstruction_error_refit"),
                                                            d.get("reconstruction_error_down")] for d in decisions}
            if skip is not None:
                decisions, stats = _decisions(report, "fuse-moe")
                row["betas"] = [d["moe"]["skip"]["beta"] for d in decisions]
                row["skip_calibration_perplexity"] = stats.get("skip calibration perplexity (dense, skipped)")
                row["skipped_calibration"] = stats.get("expert evaluations skipped")
                row["skipped_validation"] = skipped_on(dense_model, windows, row["betas"], args.batch)
        delta = 100 * (ppl / dense - 1)
        target = _spec(run)[2] if run != "dense" else None
        met = None
        if target is not None and target[0] == "delta":
            met = delta <= target[1]
        elif target is not None:
            met = row["skipped_validation"] >= target[1] and delta <= target[2]
        row.update({"perplexity": ppl, "dense_perplexity": dense, "delta_pct": delta, "target": target, "met": met,
                    "seconds": round(time.perf_counter() - t0, 1)})
        results.append(row)
        skipped = f"  skipped {100 * row['skipped_validation']:.1f} %" if "skipped_validation" in row else ""
        print(f"{run:22s} ppl {ppl:8.4f}  {delta:+7.2f} %{skipped}  "
              f"{'' if met is None else ('met' if met else 'MISSED')}  ({row['seconds']} s)", file=sys.stderr,
              flush=True)

    out = {"device": device_name(),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "commit": _commit(),
           "method": "fixtures README: float32, non-overlapping 512-token windows of validation.txt, mean loss over "
                     "511 predicted positions per window; moe-prune sequential; skipped fractions on validation "
                     "from the dense model's routing",
           "model": MODEL, "windows": len(windows),
           "calibration": {"source": "train.txt (first windows)", "samples": len(calibration), "seq_len": WINDOW},
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
