"""Every Triton kernel compiled ahead of time for sm_90 and sm_80 on this machine (no GPU needed): `main`.

The full set of `llmcompress.testing.gpu_compile`: each hand-written kernel's launch at decode and prefill shapes
(M = 1, 3, 16, 64, 512 at K = N = 4096, and M = 3, 77 at K = 5504, N = 1000), in float16, bfloat16 and float32,
with every config its launcher offers for the target (the configs pruned for shared memory are listed, not
compiled), and the code generator's kernels for the fusion tests' groups at M = 1, 512 (and 3 rows of 1000); each
distinct specialization compiled once to cubin with Triton's ptxas.

Results: `--out` (default `benchmarks/results/gpu_compile.json`): per kernel, variant, dtype, shape, config and
target: `regs`, `spill_stores` / `spill_loads` (bytes per thread), `shared` (bytes per block), `shared_limit`,
`shared_estimate` (the launcher's upper bound that decides which configs are offered), `offered`, `ok`, `error`,
`compile_s`; fp8 on sm_80 is a row with `refused` (the launcher's error) instead; `complete` is false while the run
goes on (the file is rewritten every 25 compiles). Prints a summary table per kernel and target: compiles, failures,
spilling configs, pruned configs, the largest shared memory.

    python benchmarks/gpu_compile.py                 # the full set, --jobs 2 (see benchmarks/README.md for time)
    python benchmarks/gpu_compile.py --families codegen --targets sm_90
    python benchmarks/gpu_compile.py --families sparse --out benchmarks/results/gpu_compile_sparse.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs Triton's compiler, not its interpreter

from llmcompress.testing import gpu_compile


def summary(rows: list[dict]) -> str:
    table = collections.defaultdict(lambda: {"compiles": 0, "failed": 0, "spilling": 0, "pruned": 0, "shared": 0})
    for r in rows:
        t = table[(r["kernel"], r["target"])]
        if "refused" in r:
            continue
        if r.get("offered") is False and "shared" not in r:
            t["pruned"] += 1
            continue
        t["compiles"] += 1
        t["failed"] += not r["ok"]
        t["spilling"] += r.get("spill_stores", 0) > 0
        t["shared"] = max(t["shared"], r.get("shared", 0))
    lines = ["| kernel | target | compiled | failed | spilling | pruned | max shared B |",
             "|---|---|---|---|---|---|---|"]
    for (kernel, target), t in sorted(table.items()):
        lines.append(f"| {kernel} | {target} | {t['compiles']} | {t['failed']} | {t['spilling']} | {t['pruned']} | "
                     f"{t['shared']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(gpu_compile.FAMILIES))
    parser.add_argument("--targets", default="sm_90,sm_80")
    # bf16 and fp32 first: a run cut short (the JSON is rewritten every 25 compiles) has the two that differ most.
    parser.add_argument("--dtypes", default="bfloat16,float32,float16")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "gpu_compile.json"))
    args = parser.parse_args(argv)
    gpu_compile.main(["--set", "full", "--families", args.families, "--targets", args.targets, "--dtypes",
                      args.dtypes, "--jobs", str(args.jobs), "--out", args.out, "--progress"])
    rows = json.loads(pathlib.Path(args.out).read_text())["rows"]
    print(summary(rows))
    return 1 if any(not r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
