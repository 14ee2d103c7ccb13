"""tiny-mixtral through `fuse-moe` on a CPU is no slower than through the default recipe (issue 15): the same
fixture model compiled with Inductor, by the default recipe and by the default recipe plus `fuse-moe` (objective
speed: the cost model decides per block), timed side by side in one process at decode (1 token) and prefill (128
tokens), batch 1, configs interleaved.

On a CPU `moe_route` and `moe_experts` run their PyTorch references (a loop over the experts that received tokens),
against transformers' `grouped_mm` experts (a sort and a loop over the experts in `grouped_mm_fallback`).

    python benchmarks/moe_cpu.py [--model ../shared/fixtures/tiny-mixtral] [--seq 1,128] [--repeats 30]

JSON (`--out`, default `benchmarks/results/moe_cpu.json`): device, versions, settings, results {config: {seq:
median_s}}, ratios {seq: fused / default}, fused {seq: blocks fused}, met (every ratio <= 1 + tolerance).
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared" / "fixtures" / "tiny-mixtral"))
    p.add_argument("--seq", default="1,128", help="comma-separated sequence lengths (batch 1)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--tolerance", type=float, default=0.02, help="noise allowance on 'no slower' (ratio <= 1+tol)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "moe_cpu.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    from llmcompress.cost.device_profile import device_name
    from llmcompress.recipes import load_recipe
    from llmcompress.version import __version__

    seqs = [int(s) for s in args.seq.split(",")]
    default = {s.name: dict(s.options) for s in load_recipe("default").passes}
    configs = {"default": default, "default + fuse-moe": {**default, "fuse-moe": {}}}
    fused: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models = {}
        for name, passes in configs.items():
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            report = Path(tmp) / f"{len(models)}.json"
            models[name] = (torch.compile(model, backend="llmcompress", dynamic=False,
                                          options={"passes": passes, "report": str(report)}), report)
        ids = {s: torch.randint(0, 1000, (1, s), generator=torch.Generator().manual_seed(s)) for s in seqs}
        for name, (m, report) in models.items():
            for s in seqs:
                m(ids[s])  # compile: one graph per sequence length, each priced at its own token count
                if name != "default":
                    graph = json.loads(report.read_text())["graphs"][-1]
                    fused[str(s)] = sum(d["moe"]["fused"] for pa in graph["passes"] if pa["name"] == "fuse-moe"
                                        for d in pa["decisions"])
        samples = {name: {s: [] for s in seqs} for name in configs}
        for _ in range(args.repeats):
            for name, (m, _) in models.items():
                for s in seqs:
                    t0 = time.perf_counter()
                    m(ids[s])
                    samples[name][s].append(time.perf_counter() - t0)
    results = {name: {str(s): statistics.median(v) for s, v in samples[name].items()} for name in configs}
    ratios = {s: results["default + fuse-moe"][s] / results["default"][s] for s in results["default"]}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                            text=True).stdout
    doc = {"benchmark": "moe_cpu", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit.strip(),
           "command": " ".join(["python", *(sys.argv if argv is None else [__file__, *argv])]),
           "device": {"type": "cpu", "cpu_model": device_name(torch.device("cpu")),
                      "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "llmcompress": __version__},
           "settings": {"model": args.model, "dtype": "float32", "lowering": "inductor", "seqs": seqs,
                        "repeats": args.repeats, "timer": "perf_counter median per forward, configs interleaved",
                        "tolerance": args.tolerance},
           "results": results, "ratios": ratios, "blocks_fused": fused,
           "met": all(r <= 1 + args.tolerance for r in ratios.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print({s: f"{r:.3f}x default" for s, r in ratios.items()}, "blocks fused", fused, "met", doc["met"])
    return doc


if __name__ == "__main__":
    main()
