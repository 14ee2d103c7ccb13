"""A sequentially calibrated pass recompiled after one weight of the model changed in place must give what a cold
compile of the changed model gives: the cache may save time, never change a result. Two ways it could not:
* the last layer changed: the layers before it come from the cache and the changed one is computed; it must be
  fitted to the rows the cached layers produce (`Calibration.run_sequential(known=...)`), not the float model's;
* the first layer changed: every layer after it was calibrated on rows that came through the old weight, so their
  cached results are stale although their own weights did not change (a calibrated entry's memory key holds every
  weight's version, `FrozenWeights.model_state`, as its disk key holds their content).
Oracle: the same changed model compiled cold (its own cache folder, a fresh model: nothing cached in memory)."""

from __future__ import annotations

import pytest
import torch

from llmcompress.testing.models import VOCAB, example_ids, main_output, tiny_model

CALIBRATION = torch.randint(2, VOCAB, (8, 16), generator=torch.Generator().manual_seed(11))
PASSES = {
    "quantize-linear": {"scheme": "w4a16", "group_size": 32, "method": "gptq"},
    "sparsify-linear": {"method": "sparsegpt", "sparsity": 0.5},
    "lowrank-split": {"method": "svd-llm", "objective": "memory", "overrides": {"*_proj": {"rank": 12}}},
}
CHANGED = {"last": lambda m: m.model.layers[-1].mlp.down_proj, "first": lambda m: m.model.layers[0].self_attn.o_proj}


def _changed(model: torch.nn.Module, where: str) -> torch.nn.Module:
    with torch.no_grad():
        CHANGED[where](model).weight.mul_(1.5)
    return model


def _run(model: torch.nn.Module, name: str) -> torch.Tensor:
    torch._dynamo.reset()
    options = {"lowering": "eager", "calibration": CALIBRATION, "calibration_samples": 8, "calibration_seq_len": 16,
               "passes": {"canonicalize": {}, name: PASSES[name]}}
    with torch.no_grad():
        return main_output(torch.compile(model, backend="llmcompress", options=options)(example_ids(2, 9, seed=4)))


# Each pass hands its cached layers to the calibration run itself; the staleness check is the weights cache's, one
# place for every pass.
@pytest.mark.parametrize("name,where", [*((name, "last") for name in sorted(PASSES)), ("quantize-linear", "first")])
def test_a_recompile_after_a_weight_changed_equals_a_cold_compile(name, where, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMPRESS_CACHE_DIR", str(tmp_path / "cold"))
    cold = _run(_changed(tiny_model("llama"), where), name)
    monkeypatch.setenv("LLMCOMPRESS_CACHE_DIR", str(tmp_path / "warm"))
    model = tiny_model("llama")
    first = _run(model, name)  # caches every layer's result
    again = _run(_changed(model, where), name)
    assert not torch.allclose(first, again)
    torch.testing.assert_close(again, cold, atol=1e-5, rtol=1e-5)
