"""Tests for llmcompress/calibration/feeds.py and the model-input form of calibration/data.py: which graph input the
data feeds (by Dynamo's names), what is derived for the rest, padding and its mask, and the errors for bad data."""

from __future__ import annotations

import pytest
import torch

from llmcompress.calibration.data import (
    CalibrationWarning,
    describe_calibration,
    fingerprint,
    input_rows,
    load_calibration,
)
from llmcompress.calibration.feeds import graph_feeds, input_key
from llmcompress.errors import OptionError

INT = torch.int64


def test_input_key_strips_dynamos_frame_names():
    assert input_key("L_input_ids_") == "input_ids"
    assert input_key("l_kwargs_token_type_ids_") == "token_type_ids"
    assert input_key("l_args_0_") == "input_ids"  # the first positional argument
    assert input_key("l_args_1_") == "1"
    assert input_key("L_attention_mask_") == "attention_mask"


def _static_graph(batch: int, seq: int, names: list[str]) -> list[torch.Tensor]:
    return [torch.zeros(batch, seq, dtype=INT) for _ in names]


def test_windows_feed_the_ids_and_derive_mask_and_token_types():
    names = ["l_kwargs_attention_mask_", "l_args_0_", "l_kwargs_token_type_ids_"]
    windows = torch.arange(100, 124, dtype=INT).reshape(3, 8)  # 24 tokens -> 4 rows of 6 -> 2 chunks of (2, 6)
    feeds = graph_feeds(_static_graph(2, 6, names), names, windows)
    assert not isinstance(feeds, str), feeds
    assert len(feeds.args) == 2 and feeds.tokens == 24 and feeds.masks == [None, None]
    mask, ids, types = feeds.args[1]
    assert torch.equal(ids, torch.arange(112, 124, dtype=INT).reshape(2, 6))
    assert torch.equal(mask, torch.ones(2, 6, dtype=INT)) and torch.equal(types, torch.zeros(2, 6, dtype=INT))


def _rows() -> list[dict[str, torch.Tensor]]:
    """Four sequences of 8, 5, 3 and 6 tokens with two token-type segments, as two padded batches."""
    out = []
    for lengths, base in (((8, 5), 10), ((3, 6), 50)):
        ids = torch.zeros(2, 8, dtype=INT)
        mask = torch.zeros(2, 8, dtype=INT)
        types = torch.zeros(2, 8, dtype=INT)
        for i, n in enumerate(lengths):
            ids[i, :n] = torch.arange(base + 10 * i, base + 10 * i + n)
            mask[i, :n] = 1
            types[i, n // 2:n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "text": "not an input"})
    return out


def test_model_inputs_are_matched_by_name_and_padding_is_masked():
    rows = input_rows(_rows(), samples=4, seq_len=8)
    assert [int(r["attention_mask"].sum()) for r in rows] == [8, 5, 3, 6] and "text" not in rows[0]
    names = ["l_kwargs_attention_mask_", "l_args_0_", "l_kwargs_token_type_ids_"]
    feeds = graph_feeds(_static_graph(2, 6, names), names, rows)
    assert not isinstance(feeds, str), feeds
    assert feeds.tokens == 6 + 5 + 3 + 6  # rows cut to the graph's 6 tokens; padding not counted
    mask, ids, types = feeds.args[0]
    assert torch.equal(ids, torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 0]]))
    assert torch.equal(mask, torch.tensor([[1] * 6, [1] * 5 + [0]]))
    assert torch.equal(types, torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 0]]))  # the data's, not zeros
    assert torch.equal(feeds.masks[0], mask.bool())
    mask, ids, types = feeds.args[1]
    assert torch.equal(mask, torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]))
    assert torch.equal(feeds.masks[1], mask.bool())


def test_without_a_mask_input_short_rows_are_dropped_not_padded():
    names = ["L_input_ids_"]
    feeds = graph_feeds(_static_graph(1, 6, names), names, input_rows(_rows(), 4, 8))
    assert not isinstance(feeds, str), feeds
    assert [a[0][0, 0].item() for a in feeds.args] == [10, 60]  # the 8- and 6-token rows; 5 and 3 are too short
    assert feeds.tokens == 12 and feeds.masks == [None, None]
    reason = graph_feeds(_static_graph(1, 9, names), names, input_rows(_rows(), 4, 8))
    assert isinstance(reason, str) and "no attention mask" in reason and "longest has 8" in reason


def test_inputs_that_cannot_be_fed_say_why():
    names = ["l_args_0_", "l_args_1_"]
    values = [torch.zeros(1, 6, dtype=INT), torch.zeros(1, 6, dtype=INT)]
    reason = graph_feeds(values, names, torch.arange(48, dtype=INT).reshape(4, 12))
    assert isinstance(reason, str) and "l_args_1_" in reason and "by keyword" in reason
    decode = graph_feeds([torch.zeros(1, 1, dtype=INT)], ["L_input_ids_"], torch.arange(8).reshape(1, 8))
    assert decode == "the graph is a decode step (one token per sequence)"
    embeds = graph_feeds([torch.zeros(1, 6, 8)], ["L_inputs_embeds_"], torch.arange(8).reshape(1, 8))
    assert isinstance(embeds, str) and "no input is a (batch, seq) tensor of token ids" in embeds


def test_rows_from_a_dataset_are_capped_and_cut():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]],
                                     "attention_mask": [[1] * 5, [1, 1], [1, 1, 1]], "sentence": ["a", "b", "c"]})
    rows = load_calibration(ds, None, samples=2, seq_len=4)
    assert [r["input_ids"].tolist() for r in rows] == [[5, 6, 7, 8], [11, 12]]
    assert set(rows[0]) == {"input_ids", "attention_mask"}
    with pytest.warns(CalibrationWarning, match="3 sequences instead of the 8"):
        input_rows(ds, samples=8, seq_len=4)


def test_one_dict_is_one_batch_and_padding_at_either_end_is_stripped():
    """A tokenizer's output passed as it is: right padding (row 0) and left padding (row 1) removed."""
    batch = {"input_ids": torch.tensor([[7, 8, 9, 0, 0], [0, 0, 4, 5, 6]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])}
    assert describe_calibration(batch) is None
    rows = load_calibration(batch, None, samples=2, seq_len=8)
    assert [r["input_ids"].tolist() for r in rows] == [[7, 8, 9], [4, 5, 6]]
    assert all(r["attention_mask"].tolist() == [1, 1, 1] for r in rows)


@pytest.mark.parametrize("data,match", [
    ([{"input_ids": torch.ones(2, 4, dtype=INT), "attention_mask": torch.ones(3, 4, dtype=INT)}],
     "'attention_mask' has shape \\(3, 4\\).*batch size 2"),
    ([{"input_ids": torch.randn(2, 4)}], "input_ids must be integers"),
])
def test_bad_model_inputs_name_the_batch_and_key(data, match):
    with pytest.raises(OptionError, match=match):
        input_rows(data, 4, 8)


def test_bad_calibration_values_are_described():
    assert "item 1 is int" in describe_calibration([{"input_ids": [1, 2]}, 3])
    assert "batch 0 has no 'input_ids'" in describe_calibration([{"ids": [1, 2]}])
    assert describe_calibration([{"input_ids": [1, 2]}]) is None
    from llmcompress.config import CompileConfig

    with pytest.raises(OptionError, match="calibration.*list of dicts of model inputs"):
        CompileConfig(calibration=[1, 2, 3])


def test_fingerprint_sees_every_input():
    rows = input_rows(_rows(), 4, 8)
    other = input_rows(_rows(), 4, 8)
    assert fingerprint(rows) == fingerprint(other)
    other[2]["token_type_ids"] = torch.zeros_like(other[2]["token_type_ids"])
    assert fingerprint(rows) != fingerprint(other)
    assert fingerprint(rows) != fingerprint(input_rows(_rows(), 3, 8))
