"""A pruned model on a CPU is never slower than the dense one (issue 13): the same model compiled with Inductor,
dense and through `sparsify-linear` (2:4 and 50 % unstructured, magnitude: no calibration needed, and the
lowering does not depend on the method), timed side by side in one process.

On a CPU every pruned layer keeps its masked dense weight (the 2:4 op's CPU path is its reference, which the cost
model never prices faster), so the pruned graphs run the same kernels on the same shapes as the dense one; this
checks that nothing else (a leftover op, a graph break) makes them slower.

    python benchmarks/sparse_cpu.py [--model ../shared/fixtures/tiny-llama] [--seq 1,128] [--repeats 30]

JSON (`--out`, default `benchmarks/results/sparse_cpu.json`): device, versions, settings, results {config: {seq:
median_s}}, ratios {config: {seq: pruned / dense}}, kernels (the report's kernel counts per config).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"dense": None, "2:4": {"method": "magnitude", "pattern": "2:4"},
           "unstructured 50 %": {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared" / "fixtures" / "tiny-llama"))
    p.add_argument("--seq", default="1,128", help="comma-separated sequence lengths (batch 1)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparse_cpu.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    from llmcompress.cost.device_profile import device_name
    from llmcompress.version import __version__

    seqs = [int(s) for s in args.seq.split(",")]
    results, kernels = {}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models = {}
        for name, sparsify in CONFIGS.items():
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            options = {"passes": {"canonicalize": {}}} if sparsify is None else {
                "passes": {"canonicalize": {}, "sparsify-linear": sparsify}}
            report = Path(tmp) / f"{len(models)}.json"
            options["report"] = str(report)
            models[name] = (torch.compile(model, backend="llmcompress", options=options, dynamic=False), report)
        ids = {s: torch.randint(0, 1000, (1, s), generator=torch.Generator().manual_seed(s)) for s in seqs}
        for name, (m, _) in models.items():
            for s in seqs:
                m(ids[s])  # compile
        samples = {name: {s: [] for s in seqs} for name in CONFIGS}
        for _ in range(args.repeats):  # interleaved, so load changes hit every config alike
            for name, (m, _) in models.items():
                for s in seqs:
                    t0 = time.perf_counter()
                    m(ids[s])
                    samples[name][s].append(time.perf_counter() - t0)
        for name, (_, report) in models.items():
            results[name] = {str(s): statistics.median(v) for s, v in samples[name].items()}
            counts: dict[str, int] = {}
            for g in json.loads(report.read_text())["graphs"]:
                for pa in g["passes"]:
                    for d in pa.get("decisions", []):
                        k = (d.get("sparsity") or {}).get("kernel")
                        if k:
                            counts[k] = counts.get(k, 0) + 1
            kernels[name] = counts
    ratios = {name: {s: results[name][s] / results["dense"][s] for s in results[name]} for name in CONFIGS
              if name != "dense"}
    doc = {"benchmark": "sparse_cpu", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "command": " ".join(["python", *(sys.argv if argv is None else [__file__, *argv])]),
           "device": {"type": "cpu", "cpu_model": device_name(torch.device("cpu")),
                      "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "llmcompress": __version__},
           "settings": {"model": args.model, "dtype": "float32", "lowering": "inductor", "seqs": seqs,
                        "repeats": args.repeats, "timer": "perf_counter median per forward, configs interleaved"},
           "results": results, "ratios": ratios, "kernels": kernels}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for name, r in ratios.items():
        print(name, {s: f"{v:.3f}x dense" for s, v in r.items()}, kernels[name])
    return doc


if __name__ == "__main__":
    main()
