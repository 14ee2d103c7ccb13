"""Expert load statistics from routing outputs, on a hand-built routing."""

from __future__ import annotations

import pytest
import torch

from llmcompress.calibration.moe_load import expert_load


def test_counts_and_mean_weights_by_hand():
    # two chunks, top-2 of 4 experts; expert 3 is never chosen
    idx = [torch.tensor([[0, 1], [1, 2]]), torch.tensor([[1, 0]])]
    w = [torch.tensor([[0.7, 0.3], [0.6, 0.4]]), torch.tensor([[0.9, 0.1]])]
    load = expert_load(idx, w, 4)
    assert load.tokens.tolist() == [2, 3, 1, 0]
    torch.testing.assert_close(load.mean_weight, torch.tensor([0.4, 0.6, 0.4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(load.share, torch.tensor([2 / 6, 3 / 6, 1 / 6, 0], dtype=torch.float64))
    assert load.total_tokens == 3
    assert load.as_dict()["tokens"] == [2, 3, 1, 0]


def test_bad_routing_raises():
    with pytest.raises(ValueError, match="outside"):
        expert_load([torch.tensor([[0, 4]])], [torch.tensor([[0.5, 0.5]])], 4)
    with pytest.raises(ValueError, match="differ"):
        expert_load([torch.tensor([[0, 1]])], [torch.tensor([0.5, 0.5])], 4)
