"""Encoders through quantize-linear's calibrated methods: a BERT and a sentence-transformers-style mean-pooling
embedder calibrate with GPTQ and AWQ on batches of their own inputs (token types, padding masks), from a list of
dicts or a datasets.Dataset, and on plain token ids (token types derived as zeros). Every linear must say gptq/awq
in the report (never a round-to-nearest fallback), and the result must be closer to the eager model than RTN's."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from llmcompress.calibration.data import CalibrationWarning
from llmcompress.testing.models import VOCAB, encoder_batch, main_output, tiny_model, tiny_sentence_encoder
from llmcompress.testing.numerics import sqnr_db


def _run(model, example: dict, method: str, calibration, samples: int, seq_len: int, tmp_path):
    """(output, quantize-linear's report record); CalibrationWarnings are errors: nothing may fall back."""
    report = tmp_path / f"{method}.json"
    options = {"lowering": "eager", "report": str(report), "calibration": calibration,
               "calibration_samples": samples, "calibration_seq_len": seq_len,
               "passes": {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "group_size": 32,
                                                                   "method": method}}}
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        out = torch.compile(model, backend="llmcompress", options=options)(**example)
    (graph,) = json.loads(report.read_text())["graphs"]
    record = next(p for p in graph["passes"] if p["name"] == "quantize-linear")
    return out if isinstance(out, torch.Tensor) else main_output(out), record


def _methods(record) -> list[str]:
    return [d["method"] for d in record["decisions"] if "method" in d]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_bert_calibrates_on_batches_of_its_own_inputs(method, tmp_path):
    batches = [encoder_batch(4, 16, seed=s) for s in range(3)]  # 12 rows of 16, 13, 10 and 7 real tokens
    example = encoder_batch(3, 12, seed=20)
    with torch.no_grad():
        dense = main_output(tiny_model("bert")(**example))
    rtn, _ = _run(tiny_model("bert"), example, "rtn", None, 12, 16, tmp_path)
    out, record = _run(tiny_model("bert"), example, method, batches, 12, 16, tmp_path)
    # 2 layers x (query, key, value, attention output, intermediate, output) + the pooler.
    assert _methods(record) == [method] * 13, record["stats"]
    # The (3, 12) graph: rows cut to 12 tokens, padded rows masked; 4 chunks of 3 of the 12 rows.
    assert record["stats"]["calibration tokens"] == 3 * (12 + 12 + 10 + 7)
    # Measured: 49.4 dB RTN, 54.8 dB GPTQ, 54.6 dB AWQ.
    assert sqnr_db(dense, out) > sqnr_db(dense, rtn) + 1.0


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_sentence_encoder_calibrates_from_a_dataset_of_inputs(method, tmp_path):
    import datasets

    rows = [encoder_batch(4, 14, seed=s) for s in range(4)]
    lengths = [int(n) for b in rows for n in b["attention_mask"].sum(dim=1)]
    ds = datasets.Dataset.from_dict({  # one unpadded sequence per row, as a tokenizer's map() leaves them
        key: [b[key][i, :n].tolist() for b in rows for i, n in enumerate(b["attention_mask"].sum(dim=1))]
        for key in ("input_ids", "attention_mask", "token_type_ids")})
    example = encoder_batch(2, 14, seed=30)
    with torch.no_grad():
        dense = tiny_sentence_encoder()(**example)
    rtn, _ = _run(tiny_sentence_encoder(), example, "rtn", None, 16, 14, tmp_path)
    out, record = _run(tiny_sentence_encoder(), example, method, ds, 16, 14, tmp_path)
    assert _methods(record) == [method] * 12  # the pooler is unused: 2 x 6 linears
    assert record["stats"]["calibration tokens"] == sum(lengths)
    # Measured on the embeddings: 46.7 dB RTN, 53.9 dB GPTQ, 55.5 dB AWQ.
    assert sqnr_db(dense, out) > sqnr_db(dense, rtn) + 1.0


def test_bert_on_token_ids_gets_zero_token_types_instead_of_round_to_nearest(tmp_path):
    """The issue's case: an encoder graph taking token_type_ids calibrated on plain token ids used to fall back to
    round to nearest ("cannot be derived from token ids")."""
    example = encoder_batch(2, 12, seed=40)
    ids = torch.randint(2, VOCAB, (8, 12), generator=torch.Generator().manual_seed(41))
    _, record = _run(tiny_model("bert"), example, "gptq", ids, 8, 12, tmp_path)
    assert _methods(record) == ["gptq"] * 13 and record["stats"]["calibration tokens"] == 96
