"""A layer that an override compresses without calibration (quantize-linear method rtn, sparsify-linear method
magnitude) inside a calibrated pass must be applied where it stands during the sequential calibration run: the
calibrated layers after it are fitted to the rows the compiled model gives them, not to the float model's.
Oracle: the model with those layers' weights replaced by their rounded / pruned values (computed here, not by the
pass) and left dense by a skip pattern, compiled with the same calibrated pass: its calibration sees those rows."""

from __future__ import annotations

import pytest
import torch

from llmcompress.formats.quantized import dequantize_int4, quantize_int4_rtn
from llmcompress.testing.models import VOCAB, example_ids, main_output, tiny_model

CALIBRATION = torch.randint(2, VOCAB, (8, 16), generator=torch.Generator().manual_seed(11))
FIRST = "model.layers.0.*"
DEFAULT_SKIP = ["lm_head", "*.gate"]


def _rounded(w: torch.Tensor) -> torch.Tensor:
    return dequantize_int4(*quantize_int4_rtn(w, 32), 32, dtype=w.dtype)


def _pruned(w: torch.Tensor) -> torch.Tensor:
    """2:4 by magnitude: the 2 largest |w| of every 4 consecutive inputs of a row."""
    groups = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    return (groups * keep).reshape(w.shape)


CASES = {
    "quantize-linear": ({"scheme": "w4a16", "group_size": 32, "method": "gptq"}, "rtn", _rounded),
    "sparsify-linear": ({"method": "sparsegpt", "pattern": "2:4"}, "magnitude", _pruned),
}


def _run(model: torch.nn.Module, name: str, options: dict) -> torch.Tensor:
    torch._dynamo.reset()
    compile_options = {"lowering": "eager", "calibration": CALIBRATION, "calibration_samples": 8,
                       "calibration_seq_len": 16, "passes": {"canonicalize": {}, name: options}}
    with torch.no_grad():
        return main_output(torch.compile(model, backend="llmcompress", options=compile_options)(example_ids(2, 9, seed=4)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_uncalibrated_override_is_applied_during_calibration(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMPRESS_CACHE_DIR", str(tmp_path))
    options, cheap, compress = CASES[name]
    got = _run(tiny_model("llama"), name, {**options, "overrides": {FIRST: {"method": cheap}}})
    oracle = tiny_model("llama")
    with torch.no_grad():
        for module in oracle.model.layers[0].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(compress(module.weight))
    want = _run(oracle, name, {**options, "skip": [*DEFAULT_SKIP, FIRST]})
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
