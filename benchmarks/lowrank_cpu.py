"""A split model on a CPU is never slower than the dense one (issue 14): the same fixture model compiled with
Inductor, dense and through `lowrank-split` (svd-llm, 80 % and 60 % of the linear parameters kept), timed side by side
in one process at decode (1 token) and prefill (128 tokens), batch 1.

With `objective: speed` (the default) the cost model, with this machine's calibrated CPU profile, decides per layer
and per compiled M whether the two factor linears beat the dense one (`lowrank_split._plan`); the layers it rejects
stay dense. The `objective: memory` row splits every allocated layer regardless, to show what the cost model saved
the user from (no target: it may be slower).

    python benchmarks/lowrank_cpu.py [--model ../shared/fixtures/tiny-llama] [--seq 1,128] [--repeats 30]

JSON (`--out`, default `benchmarks/results/lowrank_cpu.json`): device, versions, settings, results {config: {seq:
median_s}}, ratios {config: {seq: split / dense}}, split {config: {seq: layers split}}, met (every speed row <= 1.0
within the noise allowance `--tolerance`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"dense": None,
           "svd-llm 80 % (speed)": {"method": "svd-llm", "ratio": 0.8},
           "svd-llm 60 % (speed)": {"method": "svd-llm", "ratio": 0.6},
           "svd-llm 60 % (memory)": {"method": "svd-llm", "ratio": 0.6, "objective": "memory"}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared" / "fixtures" / "tiny-llama"))
    p.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared" / "fixtures")
    p.add_argument("--seq", default="1,128", help="comma-separated sequence lengths (batch 1)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--calib-samples", type=int, default=8, help="512-token calibration windows from train.txt")
    p.add_argument("--tolerance", type=float, default=0.02, help="noise allowance on 'never slower' (ratio <= 1+tol)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lowrank_cpu.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    from llmcompress.cost.device_profile import device_name
    from llmcompress.testing.fixtures import WINDOW, corpus_windows, load_tokenizer
    from llmcompress.version import __version__

    seqs = [int(s) for s in args.seq.split(",")]
    calibration = corpus_windows(args.fixtures, load_tokenizer(args.fixtures), "train.txt", args.calib_samples)
    results, split = {}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models = {}
        for name, opts in CONFIGS.items():
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            passes = {"canonicalize": {}} if opts is None else {"canonicalize": {}, "lowrank-split": opts}
            report = Path(tmp) / f"{len(models)}.json"
            options = {"passes": passes, "report": str(report), "calibration": calibration,
                       "calibration_samples": len(calibration), "calibration_seq_len": WINDOW}
            models[name] = (torch.compile(model, backend="llmcompress", options=options, dynamic=False), report)
        ids = {s: torch.randint(0, 1000, (1, s), generator=torch.Generator().manual_seed(s)) for s in seqs}
        for name, (m, report) in models.items():
            split[name] = {}
            # Longest first: a decode graph cannot be fed calibration data, it reuses the curves and factors the prefill
            # graph derived (same pass options and weights: the same cache keys).
            for s in sorted(seqs, reverse=True):
                m(ids[s])  # compile: one graph per sequence length (dynamic=False), each priced at its own M
                graph = json.loads(report.read_text())["graphs"][-1]
                decisions = [d["rank"] for pa in graph["passes"] for d in pa.get("decisions", []) if "rank" in d]
                split[name][str(s)] = sum(d["rank"] != "dense" for d in decisions)
        samples = {name: {s: [] for s in seqs} for name in CONFIGS}
        for _ in range(args.repeats):  # interleaved, so load changes hit every config alike
            for name, (m, _) in models.items():
                for s in seqs:
                    t0 = time.perf_counter()
                    m(ids[s])
                    samples[name][s].append(time.perf_counter() - t0)
        for name in models:
            results[name] = {str(s): statistics.median(v) for s, v in samples[name].items()}
    ratios = {name: {s: results[name][s] / results["dense"][s] for s in results[name]} for name in CONFIGS
              if name != "dense"}
    met = all(r <= 1 + args.tolerance for name, rs in ratios.items() if "(speed)" in name for r in rs.values())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                            text=True).stdout
    doc = {"benchmark": "lowrank_cpu", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit.strip(),
           "command": " ".join(["python", *(sys.argv if argv is None else [__file__, *argv])]),
           "device": {"type": "cpu", "cpu_model": device_name(torch.device("cpu")),
                      "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "llmcompress": __version__},
           "settings": {"model": args.model, "dtype": "float32", "lowering": "inductor", "seqs": seqs,
                        "repeats": args.repeats, "calibration": [len(calibration), WINDOW],
                        "timer": "perf_counter median per forward, configs interleaved", "tolerance": args.tolerance},
           "results": results, "ratios": ratios, "split_layers": split, "met": met}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for name, r in ratios.items():
        print(name, {s: f"{v:.3f}x dense" for s, v in r.items()}, "split layers", split[name])
    print("never slower (speed rows):", met)
    return doc


if __name__ == "__main__":
    main()
