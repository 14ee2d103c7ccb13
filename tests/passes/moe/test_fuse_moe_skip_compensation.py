"""fuse-moe's skip compensation (`skip_compensate`, default on with skipping): the means against a float64 loop,
the compiled model (fused: skipped in moe_route; declined: skipped on the routing weights) equal to the eager model
with the rule and the compensation from means computed here, β 0 bit-identical to no skipping, the budget's
calibration runs compensating as the compiled model does, no calibration data raises."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
import transformers

from llmcompress.backend import make_backend
from llmcompress.passes.moe.routing import route
from llmcompress.passes.moe.skip import apply_skip, skip_slots
from llmcompress.passes.moe.skip_compensation import compensation_means

VOCAB = 96


def _model():
    """As test_fuse_moe_skip: Mixtral, grouped_mm experts, routers 30× their initial scale (so β skips)."""
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128, intermediate_size=40,
                                        num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(30)
    return model


def _ids(seed=1, batch=2, seq=9):
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


CAL = _ids(3)


def _compile(fuse, report, cal=True, graphs=None):
    torch._dynamo.reset()
    options = {"lowering": "eager", "strict": True, "report": str(report),
               "passes": {"canonicalize": {}, "fuse-moe": fuse}}
    if cal:
        options.update(calibration=CAL, calibration_samples=CAL.shape[0], calibration_seq_len=CAL.shape[1])
    backend = "llmcompress" if graphs is None else make_backend(on_graph=lambda b, a, ctx: graphs.append(a))
    return torch.compile(_model(), backend=backend, options=options)


def _record(path):
    graphs = json.loads(path.read_text())["graphs"]
    record = next(p for g in graphs for p in g["passes"] if p["name"] == "fuse-moe")
    return [d["moe"] for d in record["decisions"]], record["stats"]


def _expert(x, gate_up, down):
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T


def _means_loop(xs, mlp, beta, bias=None):
    """(E, H) float64 from the definition, slot by slot: Σ w² y / Σ w² over the slots skipped at β."""
    gate_up, down = mlp.experts.gate_up_proj.double(), mlp.experts.down_proj.double()
    e, h = gate_up.shape[0], gate_up.shape[2]
    num, den = torch.zeros(e, h, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)
    for x in xs:
        w, ids = route(F.linear(x, mlp.gate.weight, bias), 2, True)
        for t in range(x.shape[0]):
            for j in range(2):
                if w[t, j] < beta * w[t].max():
                    ex, wt = int(ids[t, j]), float(w[t, j])
                    num[ex] += wt * wt * _expert(x[t].double(), gate_up[ex], down[ex])
                    den[ex] += wt * wt
    return num / den.clamp_min(1e-30).unsqueeze(-1)


def _block_inputs(model, ids):
    """Each MoE block's input (T, H) on `ids`, per layer."""
    seen = [[] for _ in model.model.layers]
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1])))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


def _eager_compensated(ids, beta, compensate=True):
    """The eager model with the rule on its routers' weights and, per block, + Σ skipped w × the means computed by
    `_means_loop` on the calibration tokens (dense model)."""
    model = _model()
    means = [_means_loop(xs, layer.mlp, beta).float() for xs, layer in zip(_block_inputs(model, CAL),
                                                                            model.model.layers)]
    routing = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def gate_hook(_m, _i, out, i=i):
            routing[i] = (out[1], out[2])
            return out[0], apply_skip(out[1], beta), out[2]

        def block_hook(_m, _i, out, i=i):
            w, ex = routing[i]
            extra = ((w * skip_slots(w, beta)).unsqueeze(-1) * means[i][ex]).sum(1)
            return out + extra.view(out.shape).to(out.dtype) if compensate else out
        handles += [layer.mlp.gate.register_forward_hook(gate_hook), layer.mlp.register_forward_hook(block_hook)]
    with torch.no_grad():
        out = model(ids).logits
    for h in handles:
        h.remove()
    return out


def test_means_equal_the_definition_in_float64():
    model = _model()
    xs = _block_inputs(model, CAL)[1]
    mlp = model.model.layers[1].mlp
    betas = (0.2, 0.5, 0.9)
    bias = torch.tensor([0.0, 0.0, 0.0, -1e4])  # expert 3 gets no tokens
    got = compensation_means(xs, mlp.gate.weight, bias, mlp.experts.gate_up_proj, mlp.experts.down_proj, 2, True,
                             betas)
    for b, beta in enumerate(betas):
        want = _means_loop(xs, mlp, beta, bias)
        torch.testing.assert_close(got[b].double(), want, atol=1e-5, rtol=1e-4)
    assert (got[:, 3] == 0).all()  # no tokens: no compensation
    assert (got[2, :3].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("objective", ["always", "speed"])
def test_compensated_skipping_equals_eager_fused_or_not(objective, tmp_path):
    """`always`: fused, the slots dropped in moe_route and the compensation added after moe_experts; `speed` on a
    CPU: declined, the rule on the routing weights and the same compensation after the block's experts."""
    ids = _ids()
    with torch.no_grad():
        out = _compile({"objective": objective, "skip_beta": 0.5}, tmp_path / "r.json")(ids).logits
    expected = _eager_compensated(ids, 0.5)
    plain = _eager_compensated(ids, 0.5, compensate=False)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert (out - plain).abs().max() > 2e-3  # the compensation changed the model (20x the tolerance)
    decisions, stats = _record(tmp_path / "r.json")
    assert [d["fused"] for d in decisions] == [objective == "always"] * 2
    assert all(d["skip"].get("compensated") for d in decisions)
    assert stats["skip compensated layers"] == 2


def test_a_fused_block_routes_once(tmp_path):
    """Fused with compensation: the compensation reads moe_route's weights and ids, so the block's own routing (its
    softmax and top-k) is gone from the graph; the result is checked against the eager model above."""
    graphs = []
    with torch.no_grad():
        _compile({"objective": "always", "skip_beta": 0.5}, tmp_path / "r.json", graphs=graphs)(_ids())
    nodes = list(graphs[0].graph.nodes)
    comps = [n for n in nodes if n.target is torch.ops.llmcompress.moe_skip_compensate.default]
    assert len(comps) == 2
    for comp in comps:
        for arg in comp.args[1:3]:
            assert arg.args[0].target is torch.ops.llmcompress.moe_route.default  # getitem of moe_route
    routing_ops = (torch.ops.aten.topk.default, torch.ops.aten._softmax.default, torch.ops.aten.softmax.int)
    assert not [n for n in nodes if n.target in routing_ops]


def test_beta_zero_is_bit_identical_to_no_skipping(tmp_path):
    ids = _ids()
    with torch.no_grad():
        plain = _compile({"objective": "always"}, tmp_path / "a.json")(ids).logits
        zero = _compile({"objective": "always", "skip_beta": 0.0}, tmp_path / "b.json")(ids).logits
    assert torch.equal(plain, zero)
    decisions, _ = _record(tmp_path / "b.json")
    assert not any(d["skip"].get("compensated") for d in decisions)


def test_budget_calibrates_with_the_compensation(tmp_path):
    """The calibration perplexity the budget's runs measured is the compiled (compensated) model's on the
    calibration tokens, within the budget."""
    budget = 0.02
    compiled = _compile({"objective": "always", "skip_budget": budget}, tmp_path / "r.json")
    with torch.no_grad():
        logits = compiled(CAL).logits
    decisions, stats = _record(tmp_path / "r.json")
    assert any(d["skip"]["beta"] > 0 for d in decisions)
    assert all(d["skip"].get("compensated") for d in decisions if d["skip"]["beta"] > 0)
    ppl = math.exp(float(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), CAL[:, 1:].reshape(-1))))
    dense_ppl, skipped_ppl = stats["skip calibration perplexity (dense, skipped)"]
    # The stat is rounded to 4 decimals; the compensation moves this random model's perplexity by about 1e-3.
    assert abs(skipped_ppl - ppl) < 1e-4
    assert skipped_ppl <= dense_ppl * (1 + budget) + 1e-4


def test_skip_beta_without_calibration_data_raises(tmp_path):
    from llmcompress.errors import OptionError

    compiled = _compile({"skip_beta": 0.3}, tmp_path / "r.json", cal=False)
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(_ids())
    e = info.value
    while e.__cause__ is not None or getattr(e, "inner_exception", None) is not None:
        e = e.__cause__ or e.inner_exception
    assert isinstance(e, OptionError) and re.search("skip_compensate: false", str(e)), repr(e)
