"""Tests for llmcompress/calibration/service.py, the calibration API passes get as `ctx.calibration`, on graphs the
backend captured: statistics at linears against the eager model's own inputs (forward hooks, float64), padding left
out, statistics shared by the targets reading one activation, hidden states and MoE routing against eager, results
kept per graph state, and dynamic shapes fed at the data's own length."""

from __future__ import annotations

import pytest
import torch

from llmcompress.backend import make_backend
from llmcompress.calibration import service as service_mod
from llmcompress.testing.models import VOCAB, encoder_batch, tiny_model

aten = torch.ops.aten


def _capture(model, example: dict, calibration, samples: int, seq_len: int, dynamic: bool = False):
    """(the captured aten graph after canonicalize (linears as aten.linear), its PassContext)."""
    seen = []
    options = {"lowering": "eager", "passes": {"canonicalize": {}}, "calibration": calibration,
               "calibration_samples": samples, "calibration_seq_len": seq_len}
    compiled = torch.compile(model, backend=make_backend(on_graph=lambda before, after, ctx: seen.append(
        (after, ctx))), options=options, dynamic=dynamic)
    with torch.no_grad():
        compiled(**example)
    (gm, ctx), = seen
    return gm, ctx


def _linears(gm, ctx) -> dict[torch.fx.Node, str]:
    """aten.linear nodes -> their module path."""
    return {n: ctx.weights.name(n.args[1]).removesuffix(".weight") for n in gm.graph.nodes
            if n.target is aten.linear.default}


def _eager_inputs(model, batches: list[dict]) -> dict[str, list[torch.Tensor]]:
    """Each nn.Linear's input in every batch, from the eager model (the oracle)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0]))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_statistics_at_linears_are_the_eager_models_inputs():
    model = tiny_model("llama")
    windows = torch.randint(2, VOCAB, (4, 11), generator=torch.Generator().manual_seed(3))
    gm, ctx = _capture(model, {"input_ids": windows[:2]}, windows, 4, 11)
    linears = _linears(gm, ctx)
    got = ctx.calibration.statistics(gm, list(linears), ("gram", "absmax", "absmean"))
    # The static (2, 11) graph takes the 4 windows as 2 chunks of 2.
    oracle = _eager_inputs(model, [{"input_ids": windows[:2]}, {"input_ids": windows[2:]}])
    assert len(got) == 15  # 2 layers x 7 linears + lm_head
    for node, name in linears.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in oracle[name]]).double()
        st = got[node]
        assert st["rows"] == 44
        torch.testing.assert_close(st["gram"].double(), x.T @ x / 44, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["absmax"].double(), x.abs().amax(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st["absmean"].double(), x.abs().mean(0), rtol=1e-5, atol=1e-6)


def test_padding_is_left_out_of_the_statistics():
    """BERT on padded batches of its own inputs: statistics over the real tokens only (an encoder's padded
    positions carry activations too, which would otherwise count)."""
    model = tiny_model("bert")
    batches = [encoder_batch(2, 9, seed=s) for s in (4, 5)]
    for b in batches:  # rows of 9, 6 real tokens: padding in every chunk
        assert int(b["attention_mask"].sum()) == 15
    gm, ctx = _capture(model, batches[0], batches, 4, 9)
    linears = _linears(gm, ctx)
    got = ctx.calibration.statistics(gm, list(linears), ("gram",))
    oracle = _eager_inputs(model, batches)
    masks = [b["attention_mask"].bool() for b in batches]
    checked = 0
    for node, name in linears.items():
        if name.endswith("pooler.dense"):
            continue  # reads the first token only
        x = torch.cat([t[m] for t, m in zip(oracle[name], masks)]).double()
        assert got[node]["rows"] == 30
        torch.testing.assert_close(got[node]["gram"].double(), x.T @ x / 30, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == 12


def test_targets_reading_one_activation_share_its_statistics(monkeypatch):
    model = tiny_model("llama")
    windows = torch.randint(2, VOCAB, (4, 11), generator=torch.Generator().manual_seed(3))
    gm, ctx = _capture(model, {"input_ids": windows[:2]}, windows, 4, 11)
    linears = _linears(gm, ctx)
    made = []
    real = service_mod.Statistics
    monkeypatch.setattr(service_mod, "Statistics", lambda *a, **k: made.append(a) or real(*a, **k))
    seen = {}

    def on_target(inputs):
        parts = linears[inputs.node].split(".")  # model.layers.0.self_attn.q_proj -> q_proj0
        seen[parts[-1] + (parts[2] if len(parts) > 2 else "")] = inputs.statistics("gram")
        # returns None: the node stays as it is

    ctx.calibration.run_sequential(gm, list(linears), on_target)
    assert seen["q_proj0"]["gram"] is seen["k_proj0"]["gram"] is seen["v_proj0"]["gram"]
    assert seen["gate_proj1"]["gram"] is seen["up_proj1"]["gram"]
    assert seen["o_proj0"]["gram"] is not seen["q_proj0"]["gram"]
    # One accumulation per distinct activation: per layer q/k/v, o, gate/up, down; then lm_head.
    assert len(made) == 2 * 4 + 1


def test_known_replacements_stand_in_for_cached_targets():
    """A target whose replacement is already known (cached by an earlier compile) is applied where it stands, so
    the targets after it see the inputs they see when every target is replaced through on_target; on_target and
    progress see only the targets asked for. Oracle: the eager model with the same layers halved (hooks)."""
    model = tiny_model("llama")
    windows = torch.randint(2, VOCAB, (4, 11), generator=torch.Generator().manual_seed(3))
    gm, ctx = _capture(model, {"input_ids": windows[:2]}, windows, 4, 11)
    linears = _linears(gm, ctx)
    halved = [n for n, name in linears.items() if name.startswith("model.layers.0.")]
    later = [n for n, name in linears.items() if name.startswith("model.layers.1.")]

    def half(x, w, *rest):
        return torch.nn.functional.linear(x, w * 0.5, *rest)

    seen, asked, progress = {}, [], []

    def on_target(inputs):
        asked.append(inputs.node)
        seen[inputs.node] = inputs.statistics("gram")["gram"]

    ctx.calibration.run_sequential(gm, later, on_target, known={n: half for n in halved},
                                   progress=progress.append)
    assert asked == later and progress == list(range(1, len(later) + 1))
    eager = tiny_model("llama")
    with torch.no_grad():
        for name, m in eager.named_modules():
            if name.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear):
                m.weight.mul_(0.5)
    oracle = _eager_inputs(eager, [{"input_ids": windows[:2]}, {"input_ids": windows[2:]}])
    for node in later:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in oracle[linears[node]]]).double()
        torch.testing.assert_close(seen[node].double(), x.T @ x / 44, rtol=1e-5, atol=1e-6)


def test_hidden_states_are_the_nodes_values():
    model = tiny_model("llama")
    windows = torch.randint(2, VOCAB, (4, 11), generator=torch.Generator().manual_seed(3))
    gm, ctx = _capture(model, {"input_ids": windows[:2]}, windows, 4, 11)
    head = next(n for n, name in _linears(gm, ctx).items() if name == "lm_head")
    (values,) = ctx.calibration.hidden_states(gm, [head]).values()
    with torch.no_grad():
        expected = [model(windows[:2]).logits, model(windows[2:]).logits]
    assert len(values) == 2
    for got, want in zip(values, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_routing_counts_are_the_eager_routers_choices():
    model = tiny_model("mixtral")
    windows = torch.randint(2, VOCAB, (6, 16), generator=torch.Generator().manual_seed(7))
    gm, ctx = _capture(model, {"input_ids": windows[:2]}, windows, 6, 16)
    grouped = [n for n in gm.graph.nodes if n.op == "call_function" and "grouped_mm" in str(n.target)]
    assert len(grouped) == 4  # 2 layers x (gate_up, down)
    counts = ctx.calibration.routing(gm, grouped)
    expected = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: expected.append(
        (i, torch.bincount(out[2].reshape(-1), minlength=4)))) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for c in windows.split(2):
            model(c)
    for h in hooks:
        h.remove()
    per_layer = [sum(c for i, c in expected if i == layer) for layer in range(2)]
    assert all(int(p.sum()) == 6 * 16 * 2 for p in per_layer)  # every token routed to its top 2
    for layer in range(2):
        gate_up, down = grouped[2 * layer], grouped[2 * layer + 1]
        assert torch.equal(counts[gate_up], per_layer[layer]) and torch.equal(counts[down], per_layer[layer])


def test_observe_reuses_what_it_saw_until_the_graph_changes(monkeypatch):
    model = tiny_model("llama")
    windows = torch.randint(2, VOCAB, (4, 11), generator=torch.Generator().manual_seed(3))
    gm, ctx = _capture(model, {"input_ids": windows[:2]}, windows, 4, 11)
    nodes = list(_linears(gm, ctx))
    runs = []
    real = service_mod.run_sequential
    monkeypatch.setattr(service_mod, "run_sequential", lambda *a, **k: runs.append(1) or real(*a, **k))
    cal = ctx.calibration
    first = cal.statistics(gm, nodes[:3], ("gram",))
    again = cal.statistics(gm, nodes[:3], ("gram",))
    assert len(runs) == 1 and all(first[n]["gram"] is again[n]["gram"] for n in nodes[:3])
    cal.statistics(gm, nodes[:3], ("gram", "absmax"))  # a kind not computed yet: one more run
    assert len(runs) == 2
    relu = gm.graph.call_function(torch.relu, (nodes[0],))  # any rewrite makes the graph another
    nodes[0].append(relu)
    cal.statistics(gm, nodes[:3], ("gram",))
    assert len(runs) == 3


def test_dynamic_shapes_take_rows_at_their_own_length():
    model = tiny_model("bert")
    rows = [encoder_batch(3, 10, seed=8)]  # 10, 7 and 4 real tokens
    _, ctx = _capture(model, encoder_batch(2, 8, seed=1), rows, 3, 10, dynamic=True)
    feeds = ctx.calibration.feeds()
    assert not isinstance(feeds, str), feeds
    assert feeds.tokens == 21 and len(feeds.args) == 1
    names = [n.removeprefix("l_kwargs_").strip("_") for n in ctx.input_names]
    ids = feeds.args[0][names.index("input_ids")]
    assert ids.shape == (3, 10)  # one chunk padded to its longest row
    assert feeds.masks[0].sum(dim=1).tolist() == [10, 7, 4]


def test_no_data_is_a_clear_error():
    from llmcompress.calibration.service import Calibration
    from llmcompress.errors import OptionError

    cal = Calibration(None)
    assert not cal.available
    with pytest.raises(OptionError, match=r"gptq calibration: give options\['calibration'\].*list of dicts"):
        cal.require("gptq calibration")
