"""One compile + first call in a fresh process, for the disk-cache tests and `benchmarks/disk_cache.py`:
`python -m llmcompress.testing.compile_child --model llama|tiny-llama --options JSON --logits OUT.safetensors`.

`--model llama` is the in-repo random tiny Llama (`testing.models`), calibrated on 6 x 24 random tokens; `tiny-llama`
the trained fixture, calibrated on the first `--samples` x `--seq-len` tokens of the corpus' train split and called
on the first validation window. Prints one JSON line: {"seconds" (compile + first call), "pass_s" (quantize-linear's own), "derived_weights",
"quantize_stats", "calibration_runs", "disk_cache_warnings"} (the warnings themselves go to stderr); the logits go
to `--logits` (safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from llmcompress.errors import DiskCacheWarning


def _inputs(model_name: str, samples: int, seq_len: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, calibration ids, prompt)."""
    if model_name == "llama":
        from llmcompress.testing.models import VOCAB, example_ids, tiny_model

        g = torch.Generator().manual_seed(3)
        return tiny_model("llama"), torch.randint(2, VOCAB, (6, 24), generator=g), example_ids()
    from llmcompress.testing.fixtures import corpus_windows, fixtures_dir, load_model, load_tokenizer

    fixtures = fixtures_dir()
    tokenizer = load_tokenizer(fixtures)
    calibration = corpus_windows(fixtures, tokenizer, "train.txt", samples, seq_len)
    prompt = corpus_windows(fixtures, tokenizer, "validation.txt", 1)[:1, :seq_len]
    return load_model(fixtures, "tiny-llama"), calibration, prompt


def _compile(model: torch.nn.Module, calibration: torch.Tensor, prompt: torch.Tensor, extra: dict
             ) -> tuple[float, dict, object]:
    """(seconds of compile + first call, the compile report, the output)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        options = {"lowering": "eager", "calibration": calibration, "calibration_samples": calibration.shape[0],
                   "calibration_seq_len": calibration.shape[1], "report": str(report), **extra}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("always", DiskCacheWarning)
            t0 = time.perf_counter()
            compiled = torch.compile(model, backend="llmcompress", options=options)
            with torch.no_grad():
                out = compiled(prompt)
            seconds = time.perf_counter() - t0
        for w in caught:
            print(f"{w.category.__name__}: {w.message}", file=sys.stderr)
        data = json.loads(report.read_text())
        data["disk_cache_warnings"] = sum(issubclass(w.category, DiskCacheWarning) for w in caught)
        return seconds, data, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("llama", "tiny-llama"), default="llama")
    p.add_argument("--options", default="{}", help="backend options as JSON (calibration is added)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--logits", type=Path, default=None)
    args = p.parse_args(argv)

    from safetensors.torch import save_file

    from llmcompress.calibration.service import Calibration

    runs = {"n": 0}
    sequential = Calibration.run_sequential

    def counted(self, *a, **k):
        runs["n"] += 1
        return sequential(self, *a, **k)

    model, calibration, prompt = _inputs(args.model, args.samples, args.seq_len)
    Calibration.run_sequential = counted  # counts the calibration runner's runs (restored below: tests call main)
    try:
        seconds, data, out = _compile(model, calibration, prompt, json.loads(args.options))
    finally:
        Calibration.run_sequential = sequential
    logits = out.logits if hasattr(out, "logits") else out[0]
    if args.logits is not None:
        save_file({"logits": logits.detach().contiguous()}, str(args.logits))
    derived: dict[str, int] = {}
    stats: dict[str, int] = {}
    pass_s = 0.0
    for g in data["graphs"]:
        for k, v in g.get("derived_weights", {}).items():
            derived[k] = derived.get(k, 0) + v
        for rec in g.get("passes", []):
            if rec["name"] == "quantize-linear":
                if rec["status"] == "failed":
                    raise SystemExit(f"quantize-linear failed: {rec.get('error')}")
                for k, v in rec["stats"].items():
                    stats[k] = stats.get(k, 0) + v
                pass_s += rec["time_s"]
    print(json.dumps({"seconds": round(seconds, 3), "pass_s": round(pass_s, 3), "derived_weights": derived, "quantize_stats": stats,
                      "calibration_runs": runs["n"], "fallbacks": data["summary"]["fallbacks"],
                      "disk_cache_warnings": data["disk_cache_warnings"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
