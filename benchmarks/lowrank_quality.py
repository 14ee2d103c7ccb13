"""Perplexity of the trained fixtures split by `lowrank-split` (svd, asvd, svd-llm) at kept parameter fractions of
the targeted linears, beside the dense model, in one run: `main`; plus the quality/size curve as a PNG.

The method of `sparse_quality.py` (the fixtures helpers it uses): float32 weights upcast from the stored bf16,
non-overlapping 512-token windows of `pydoc-corpus/validation.txt` (the first `--windows`), loss averaged over the
511 predicted positions of each window. Calibration: `--calib-samples` windows of 512 tokens from the start of
`train.txt`. Each row compiles a fresh copy of the model (`lowering: eager`) with
`lowrank-split: {method, ratio, objective: memory}` (sequential calibration, sensitivity-allocated ranks, refit: the
pass's defaults). `objective: memory` splits every layer that saves bytes: this measures quality at a kept fraction,
not which layers pay on this CPU (with `speed`, the default, the cost model decides that per layer).

Targets (issue 14), tiny-llama svd-llm, relative to dense: 80 % kept <= +10 %, 60 % kept <= +35 %. svd and asvd
rows beside them; tiny-mixtral svd-llm at 80 % is reported with attention and MoE experts (3-D weights) split.
`--only tiny-mixtral` runs just that model's rows and merges them into the JSON, keeping the other rows (each merged
row carries its own `run`: device, versions, windows, calibration).

JSON (`--out`, default `benchmarks/results/lowrank_quality.json`): {"device", "versions", "method", "windows",
"calibration", "git": {commit, dirty}, "missing_runs" (requested rows not (yet) measured), "results": [{model, method,
ratio, split (what was targeted), perplexity, dense_perplexity, delta_pct, target_pct, met, params_kept_fraction (from
the compile report), split_layers, split_experts, seconds}]}; PNG beside it (`--png`): perplexity against kept
fraction per method.
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
from llmcompress.testing.fixtures import WINDOW, corpus_windows, fixtures_dir, load_model, load_tokenizer, perplexity

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {("tiny-llama", "svd-llm", 0.8): 10.0, ("tiny-llama", "svd-llm", 0.6): 35.0}
METHODS = ("svd", "asvd", "svd-llm")
CURVE = (0.9, 0.8, 0.7, 0.6, 0.5)
DEFAULT_RUNS = ["tiny-llama:dense", *(f"tiny-llama:{m}:{r}" for r in CURVE for m in METHODS),
                "tiny-mixtral:dense", "tiny-mixtral:svd-llm:0.8"]


def _split(report: dict) -> tuple[float | None, int, int]:
    """(params_kept_fraction, split layer count, of them 3-D expert weights) from the lowrank-split record of the
    first graph."""
    for g in report["graphs"][:1]:
        for pr in g.get("passes", []):
            if pr["name"] == "lowrank-split":
                split = [d["rank"] for d in pr["decisions"] if d.get("rank", {}).get("rank") != "dense"]
                experts = sum(1 for d in split if len(d.get("shape", ())) == 3)
                return pr["stats"].get("params_kept_fraction"), len(split), experts
    return None, 0, 0


def _row_key(row: dict) -> tuple:
    return row["model"], row["method"], row["ratio"], row.get("split")


def plot(doc: dict, path: Path) -> None:
    """Perplexity against kept fraction, one line per model and method, dense as dashed lines, from the JSON this
    script writes: the plot of `llmcompress report --lowrank-quality` (`report/lowrank_plot.py`), with the device,
    versions, windows, calibration and commit in the PNG's metadata."""
    from llmcompress.report.lowrank_plot import parse_quality, quality_figure

    fig = quality_figure(parse_quality(doc, str(path.with_suffix(".json").name)))
    info = {k: doc.get(k) for k in ("device", "versions", "windows", "calibration", "git", "missing_runs")}
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Description": json.dumps(info), "Source": "benchmarks/lowrank_quality.py"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", type=Path, default=fixtures_dir())
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="model:dense or model:method:ratio")
    p.add_argument("--windows", type=int, default=64, help="validation windows (issue 14: 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lowrank_quality.json")
    p.add_argument("--png", type=Path, default=None, help="default: --out with .png")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    p.add_argument("--only", nargs="+", metavar="MODEL", default=None,
                   help="run only the rows of these models (e.g. tiny-mixtral) and merge them into --out, keeping "
                        "its other rows")
    args = p.parse_args(argv)
    if args.only:
        models = sorted({r.split(":")[0] for r in args.runs})
        bad = [m for m in args.only if m not in models]
        if bad:
            p.error(f"--only {bad[0]!r}: no row of that model; models in --runs: {', '.join(models)}")
        args.runs = [r for r in args.runs if r.split(":")[0] in args.only]
    args.git = _git_commit()  # at the start: the code this process imported, not edits made while it runs
    png = args.png or args.out.with_suffix(".png")
    if args.replot:
        plot(json.loads(args.out.read_text()), png)
        return 0

    tokenizer = load_tokenizer(args.fixtures)
    windows = corpus_windows(args.fixtures, tokenizer, "validation.txt")[: args.windows]
    windows = windows[: len(windows) // args.batch * args.batch]
    calibration = corpus_windows(args.fixtures, tokenizer, "train.txt", args.calib_samples)
    print(f"{len(windows)} validation windows of {WINDOW}; calibration {tuple(calibration.shape)} from train.txt",
          file=sys.stderr)

    dense: dict[str, float] = {}
    results = []
    for entry in args.runs:
        name, *spec = entry.split(":")
        t0 = time.perf_counter()
        model = load_model(args.fixtures, name)
        if not spec or spec == ["dense"]:
            dense[name] = perplexity(model, windows, args.batch)
            print(f"{name:13s} dense ppl {dense[name]:8.4f}", file=sys.stderr, flush=True)
            continue
        method, ratio = spec[0], float(spec[1])
        torch._dynamo.reset()
        report = args.out.with_suffix(f".{name}.{method}.{ratio}.report.json")
        options = {"lowering": "eager", "report": str(report), "calibration": calibration,
                   "calibration_samples": len(calibration), "calibration_seq_len": WINDOW,
                   "passes": {"canonicalize": {}, "lowrank-split": {"method": method, "ratio": ratio,
                                                                     "objective": "memory"}}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            compiled = torch.compile(model, backend="llmcompress", options=options)
            ppl = perplexity(compiled, windows, args.batch)
        kept, layers, experts = _split(json.loads(report.read_text()))
        report.unlink()
        if name not in dense:
            dense[name] = perplexity(load_model(args.fixtures, name), windows, args.batch)
        delta = 100 * (ppl / dense[name] - 1)
        target = TARGETS.get((name, method, ratio))
        row = {"model": name, "method": method, "ratio": ratio,
               "split": "attention and experts" if _has_experts(model) else "decoder linears",
               "perplexity": ppl, "dense_perplexity": dense[name],
               "delta_pct": delta, "target_pct": target, "met": None if target is None else delta <= target,
               "params_kept_fraction": kept, "split_layers": layers, "split_experts": experts,
               "seconds": round(time.perf_counter() - t0, 1)}
        results.append(row)
        print(f"{name:13s} {method:8s} {ratio:.2f} ppl {ppl:8.4f}  {delta:+7.2f} %  "
              f"{'' if target is None else f'target <= +{target:.0f} %: ' + ('met' if row['met'] else 'MISSED')}"
              f"  kept {kept}  ({row['seconds']} s)", file=sys.stderr, flush=True)
        _write(args, windows, calibration, results)  # after every row: a long run that is cut short keeps its rows
    plot(_write(args, windows, calibration, results), png)
    print(f"wrote {args.out} and {png}", file=sys.stderr)
    return 0


def _has_experts(model: torch.nn.Module) -> bool:
    return any(p.dim() == 3 for p in model.parameters())


def _git_commit() -> dict:
    """The commit the run's code came from, and whether the package or this script differed from it (a run from
    uncommitted code cannot be reproduced from the commit alone)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--", "llmcompress", "benchmarks/lowrank_quality.py"))}


def _write(args: argparse.Namespace, windows: torch.Tensor, calibration: torch.Tensor, results: list[dict]) -> dict:
    done = {f"{r['model']}:{r['method']}:{r['ratio']}" for r in results}
    missing = [e for e in args.runs if e.count(":") == 2 and f"{e.rsplit(':', 1)[0]}:{float(e.rsplit(':', 1)[1])}"
               not in done]
    run = {"device": device_name(),
           "git": args.git,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "windows": len(windows),
           "calibration": {"source": "train.txt (first windows)", "samples": len(calibration), "seq_len": WINDOW}}
    if args.only and args.out.exists():  # merge: this run's rows replace those with the same key, the rest stay
        out = json.loads(args.out.read_text())
        mine = [{**r, "run": run} for r in results]
        keys = {_row_key(r) for r in mine}
        out["results"] = [r for r in out["results"] if _row_key(r) not in keys] + mine
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        return out
    out = {"device": run["device"],
           "git": run["git"],
           "versions": run["versions"],
           "method": "fixtures README: float32, non-overlapping 512-token windows of validation.txt, mean loss over "
                     "511 predicted positions per window; lowrank-split objective memory, sequential calibration, "
                     "sensitivity-allocated ranks, refit",
           "windows": len(windows),
           "calibration": {"source": "train.txt (first windows)", "samples": len(calibration), "seq_len": WINDOW},
           "results": results}
    if missing:  # rewritten after every row: a run cut short says which rows it lacks
        out["missing_runs"] = missing
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
