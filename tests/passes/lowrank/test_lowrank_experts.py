"""lowrank-split on MoE experts stored as 3-D weights (a small random Mixtral, fp32): parity of the compiled split
model with the same factors applied eagerly (attention and experts), the budget met exactly with experts in it,
per-expert whitening on each expert's routed rows (the optimum of an independent computation), recompiles reusing
the factors, and quantize-linear after the split quantizing the grouped factors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmcompress.backend import make_backend
from llmcompress.calibration.data import CalibrationWarning
from llmcompress.formats import quantized as formats
from llmcompress.fx_utils import grouped_matmul_ops
from llmcompress.passes.lowrank.allocate import LayerCurve, allocate_ranks, kept_params
from llmcompress.passes.lowrank.experts import FEW_ROWS
from llmcompress.testing.models import VOCAB, example_ids, main_output, tiny_model
from llmcompress.testing.numerics import fake_quantize_linears, sqnr_db

META = "llmcompress.lowrank"


def _cal_options(n=16, seq=32, seed=3):
    # 16 x 32 tokens, top-2 of 4 experts: about 256 routed rows per expert, above K = 96 (a full-rank XᵀX).
    cal = torch.randint(2, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
    return {"calibration": cal, "calibration_samples": n, "calibration_seq_len": seq}


def _compile(model, options, graphs=None):
    torch._dynamo.reset()
    backend = "llmcompress" if graphs is None else make_backend(on_graph=lambda b, a, ctx: graphs.append(a))
    return torch.compile(model, backend=backend, options=options)


def _record(path, index=0, name="lowrank-split"):
    graph = json.loads(path.read_text())["graphs"][index]
    return next(p for p in graph["passes"] if p["name"] == name)


def _attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _const(gm, node):
    """The stored tensor behind a weight argument (a get_attr, or a transpose of one as the experts' factors)."""
    while node.op == "call_function":
        node = node.args[0]
    return _attr(gm, node.target)


def _factors(gm):
    """{layer: (U, V)} of the split layers of a compiled graph: 2-D (N, r), (r, K); experts (E, N, r), (E, r, K)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for n in gm.graph.nodes:
        if META in n.meta:
            out.setdefault(n.meta[META]["layer"], {})[n.meta[META]["factor"]] = _const(gm, n.args[1])
    return {k: (v["u"], v["v"]) for k, v in out.items()}


class _EagerExperts(torch.nn.Module):
    """The oracle of split experts: transformers' own per-expert loop (MixtralExperts' eager forward), each 3-D
    weight run as x -> V[e] -> U[e] when split."""

    def __init__(self, experts, factors):
        super().__init__()
        self.num_experts, self.act_fn = experts.num_experts, experts.act_fn
        self.weights = {"gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj}
        self.factors = factors

    def _linear(self, x, name, e):
        if name in self.factors:
            u, v = self.factors[name]
            return F.linear(F.linear(x, v[e]), u[e])
        return F.linear(x, self.weights[name][e])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, pos = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            gate, up = self._linear(hidden_states[token], "gate_up_proj", e).chunk(2, dim=-1)
            y = self._linear(self.act_fn(gate) * up, "down_proj", e) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y)
        return out


def _apply_eagerly(model, factors):
    for name, (u, v) in factors.items():
        if u.dim() == 2:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            first = torch.nn.Linear(v.shape[1], v.shape[0], bias=False)
            second = torch.nn.Linear(u.shape[1], u.shape[0], bias=old.bias is not None)
            with torch.no_grad():
                first.weight.copy_(v)
                second.weight.copy_(u)
                if old.bias is not None:
                    second.bias.copy_(old.bias)
            setattr(parent, child, torch.nn.Sequential(first, second))
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        mine = {k.removeprefix(prefix): f for k, f in factors.items() if k.startswith(prefix)}
        layer.mlp.experts = _EagerExperts(layer.mlp.experts, mine)
    return model


def _passes(**split):
    return {"canonicalize": {}, "lowrank-split": {"objective": "memory", **split}}


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_compiled_split_model_matches_its_factors_applied_eagerly(lowering, tmp_path):
    """svd-llm, sequential, allocated at 80 %, refit: attention and experts split; two grouped matmuls per split
    3-D weight, and the graph's factors in transformers' eager expert loop give the compiled outputs."""
    ids = example_ids()
    graphs: list = []
    options = {"lowering": lowering, **_cal_options(), "report": str(tmp_path / "r.json"),
               "passes": _passes(method="svd-llm", ratio=0.8)}
    with torch.no_grad():
        dense = main_output(tiny_model("mixtral")(ids))
        out = main_output(_compile(tiny_model("mixtral"), options, graphs)(ids))
        factors = _factors(graphs[0])
        expected = main_output(_apply_eagerly(tiny_model("mixtral"), factors)(ids))
    experts = {k: f for k, f in factors.items() if f[0].dim() == 3}
    assert experts and len(factors) > len(experts)  # both kinds split
    for u, v in experts.values():
        assert u.shape[0] == v.shape[0] == 4 and u.shape[2] == v.shape[1]  # one rank for all 4 experts
    grouped = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target in grouped_matmul_ops()]
    assert sum(META in n.meta for n in grouped) == 2 * len(experts)
    split_offs = {n.meta[META]["layer"]: set() for n in grouped if META in n.meta}
    for n in grouped:
        if META in n.meta:
            split_offs[n.meta[META]["layer"]].add(n.args[2])
    assert all(len(offs) == 1 for offs in split_offs.values())  # x -> V -> U on the same offsets
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert sqnr_db(dense, out) < 40  # the split did change the model
    decisions = {d["layer"]: d["rank"] for d in _record(tmp_path / "r.json")["decisions"]}
    for name, (u, v) in experts.items():
        d = decisions[name]
        e, n, k = d["shape"]
        assert d["rank"] == v.shape[1] and d["kernel"].startswith("two grouped matmuls")
        assert d["dense_bytes"] == 4 * e * n * k and d["stored_bytes"] == 4 * e * d["rank"] * (n + k)


def test_allocated_parameters_meet_the_budget_exactly_with_experts(tmp_path):
    ratio = 0.7
    graphs: list = []
    options = {"lowering": "eager", **_cal_options(), "report": str(tmp_path / "r.json"),
               "passes": _passes(method="svd-llm", ratio=ratio)}
    with torch.no_grad():
        _compile(tiny_model("mixtral"), options, graphs)(example_ids())
    rec = _record(tmp_path / "r.json")
    model = tiny_model("mixtral")
    targeted = {n: p for n, p in model.named_parameters()
                if p.dim() == 3 or (n.endswith("_proj.weight") and "self_attn" in n)}
    total = sum(p.numel() for p in targeted.values())
    budget = int(ratio * total)
    factors = _factors(graphs[0])
    stored = sum(p.numel() for n, p in targeted.items() if n.removesuffix(".weight") not in factors)
    stored += sum(u.numel() + v.numel() for u, v in factors.values())
    assert rec["stats"]["budget params"] == budget
    assert rec["stats"]["allocated params"] == stored <= budget
    assert rec["stats"]["params_kept_fraction"] == round(stored / total, 6)
    steps = []  # every split layer's next step: one more rank, or (at the last rank that saves bytes) dense
    for d in rec["decisions"]:
        d = d["rank"]
        if d["rank"] != "dense":
            e, n, k = d["shape"] if len(d["shape"]) == 3 else (1, *d["shape"])
            last = (n * k - 1) // (n + k)
            steps.append(e * (n + k) if d["rank"] < last else e * (n * k - d["rank"] * (n + k)))
    assert budget - stored < min(steps)
    assert any(u.dim() == 3 for u, _ in factors.values())


def test_an_expert_weight_is_one_layer_whose_rank_costs_every_expert():
    """allocate.py: 4 experts of 8 x 6 (a rank costs 4 (8 + 6) = 56) beside a 2-D 8 x 6 layer (a rank costs 14)."""
    flat = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.0]).double()
    layers = [LayerCurve(8, 6, flat), LayerCurve(8, 6, flat * 10, experts=4)]
    assert layers[1].params == 192 and layers[1].rank_cost == 56
    for budget in (70, 130, 200, 240):
        ranks = allocate_ranks(layers, budget)
        spent = kept_params(layers, ranks)
        expected = sum((4 * 48 if r is None else 56 * r) if i else (48 if r is None else 14 * r)
                       for i, r in enumerate(ranks))
        assert spent == expected <= budget
        for x, r in zip(layers, ranks):  # no next step fits: one more rank, or from rank 3 (the last that saves
            if r is not None:  # parameters: 3 x 14 < 48) the rest of the dense weight
                step = x.rank_cost if r < 3 else x.params - r * x.rank_cost
                assert budget - spent < step, (budget, ranks)
    assert allocate_ranks(layers, 130)[1] is not None


def _routed_rows(model, ids):
    """{(layer, weight): [rows routed to expert e]} of the dense model: gate_up_proj's inputs are the hidden states
    of the routed tokens, down_proj's act(gate) * up of them (transformers' eager loop)."""
    rows: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts

        def hook(mod, args, i=i):
            h, index, _ = args
            for e in range(mod.num_experts):
                token, _ = torch.where(index == e)
                x = h[token].double()
                gate, up = F.linear(x, mod.gate_up_proj[e].double()).chunk(2, dim=-1)
                rows.setdefault((i, "gate_up_proj"), []).append(x)
                rows.setdefault((i, "down_proj"), []).append(mod.act_fn(gate) * up)

        hooks.append(experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return rows


def test_whitened_per_expert_truncation_is_the_optimum_on_each_experts_routed_rows(tmp_path):
    """Non-sequential svd-llm without refit at a fixed rank: each expert's output error on the rows routed to it in
    the dense model is the optimum (the dropped singular values² of W L, L from those rows' XᵀX, computed here
    independently) and below plain SVD's at the same rank."""
    cal = _cal_options(n=24)
    rows = _routed_rows(tiny_model("mixtral"), cal["calibration"])
    stored = {}
    for method in ("svd", "svd-llm"):
        graphs: list = []
        options = {"lowering": "eager", **cal, "passes": _passes(
            method=method, refit=False, sequential=False, damp=1e-6, skip=["lm_head", "*.gate", "*.self_attn.*"],
            overrides={"*.experts.*": {"rank": 20}})}
        with torch.no_grad():  # the calibration's shape: its windows reach the graph as they are (not re-cut)
            _compile(tiny_model("mixtral"), options, graphs)(cal["calibration"][:2])
        stored[method] = _factors(graphs[0])
    model = tiny_model("mixtral")
    checked = 0
    for (i, name), per_expert in rows.items():
        w = getattr(model.model.layers[i].mlp.experts, name).double()
        layer = f"model.layers.{i}.mlp.experts.{name}"
        for e, x in enumerate(per_expert):
            assert x.shape[0] > x.shape[1]  # more rows than channels: a full-rank XᵀX

            def err(u, v, e=e, x=x, w=w):
                return float((x @ (w[e] - u[e].double() @ v[e].double()).T).square().sum(1).mean())

            lower = torch.linalg.cholesky(x.T @ x / x.shape[0])
            optimum = float(torch.linalg.svdvals(w[e] @ lower)[20:].square().sum())
            whitened, plain = err(*stored["svd-llm"][layer]), err(*stored["svd"][layer])
            assert whitened == pytest.approx(optimum, rel=1e-3)
            assert whitened < 0.95 * plain, (layer, e, whitened, plain)
            checked += 1
    assert checked == 2 * 2 * 4


def test_experts_with_too_few_routed_rows_fall_back_to_plain_svd_and_say_so(tmp_path):
    options = {"lowering": "eager", **_cal_options(n=2, seq=11), "report": str(tmp_path / "r.json"),
               "passes": _passes(method="svd-llm", ratio=0.8)}
    with pytest.warns(CalibrationWarning, match="fewer than 16 calibration rows"), torch.no_grad():
        _compile(tiny_model("mixtral"), options)(example_ids())
    stats = _record(tmp_path / "r.json")["stats"]
    assert 0 < stats[FEW_ROWS] <= 2 * 2 * 4  # 22 tokens, top-2 of 4 experts: 11 rows an expert on average


def test_recompiles_reuse_the_expert_factors(tmp_path):
    report = tmp_path / "r.json"
    graphs: list = []
    options = {"lowering": "eager", **_cal_options(), "report": str(report),
               "passes": _passes(method="svd-llm", ratio=0.7)}
    compiled = _compile(tiny_model("mixtral"), options, graphs)
    with torch.no_grad():
        compiled(example_ids(seq=11))
        compiled(example_ids(seq=7))  # a new sequence length: Dynamo recompiles
    assert len(graphs) == 2
    split = _record(report, 0)["stats"]["split svd-llm"]
    assert _record(report, 1)["stats"]["factored: cached"] == split
    first, again = _factors(graphs[0]), _factors(graphs[1])
    assert any(u.dim() == 3 for u, _ in first.values()) and first.keys() == again.keys()
    assert all(again[n][0] is first[n][0] and again[n][1] is first[n][1] for n in first)


def test_quantize_linear_after_the_split_quantizes_the_grouped_factors(tmp_path):
    """lowrank-split then quantize-linear w8a16: each split expert weight becomes two grouped int8 linears on its
    factors, and the outputs are the eager oracle's: the same factors applied eagerly, then every linear (factor or
    dense) and every expert matrix quantized per channel (per expert)."""
    ids = example_ids()
    split_graphs: list = []
    graphs: list = []
    passes = _passes(method="svd-llm", ratio=0.8)
    with torch.no_grad():
        _compile(tiny_model("mixtral"), {"lowering": "eager", **_cal_options(), "passes": passes}, split_graphs)(ids)
        factors = _factors(split_graphs[0])
        out = main_output(_compile(tiny_model("mixtral"), {
            "lowering": "eager", **_cal_options(),
            "passes": {**passes, "quantize-linear": {"scheme": "w8a16", "method": "rtn"}}}, graphs)(ids))

        def fake_int8(w):
            return torch.stack([formats.dequantize_int8(*formats.quantize_int8_per_channel(x)) for x in w]) \
                if w.dim() == 3 else formats.dequantize_int8(*formats.quantize_int8_per_channel(w))

        oracle = _apply_eagerly(tiny_model("mixtral"), {k: (fake_int8(u), fake_int8(v)) if u.dim() == 3 else (u, v)
                                                         for k, (u, v) in factors.items()})
        fake_quantize_linears(oracle, "w8a16")  # the 2-D factors and the dense attention linears; not lm_head
        for layer in oracle.model.layers:
            experts = layer.mlp.experts
            experts.weights = {k: w if k in experts.factors else fake_int8(w) for k, w in experts.weights.items()}
        expected = main_output(oracle(ids))
    experts = [k for k, (u, _) in factors.items() if u.dim() == 3]
    assert experts
    grouped = [n for n in graphs[0].graph.nodes
               if n.op == "call_function" and "grouped_linear_w8a16" in str(n.target)]
    names = {n.meta["llmcompress.linear"].removesuffix(".weight") for n in grouped}
    for layer in experts:
        assert {f"{layer}.lowrank_v", f"{layer}.lowrank_u"} <= names, (layer, names)
    for n in grouped:
        assert _attr(graphs[0], n.args[1].target).dtype == torch.int8
    assert not [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target in grouped_matmul_ops()]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


# --- the trained tiny-mixtral fixture ----------------------------------------------------------------------------


def _fixtures():
    from llmcompress.testing.fixtures import fixtures_dir, missing

    fixtures = fixtures_dir()
    if missing(fixtures):
        pytest.fail(missing(fixtures))
    return fixtures


@pytest.mark.fixtures
def test_whitened_per_expert_truncation_beats_plain_svd_on_held_out_routed_rows_of_tiny_mixtral():
    from llmcompress.calibration.stats import statistics_of
    from llmcompress.passes.lowrank.experts import decompose_experts
    from llmcompress.testing.fixtures import corpus_windows, load_model, load_tokenizer

    fixtures = _fixtures()
    model = load_model(fixtures, "tiny-mixtral")
    ids = corpus_windows(fixtures, load_tokenizer(fixtures), "train.txt", 32, 256)
    rows = _routed_rows(model, ids)
    layer, name = 2, "gate_up_proj"
    w = getattr(model.model.layers[layer].mlp.experts, name).detach()  # (8, 512, 384)
    per_expert = rows[(layer, name)]
    fits = [x[: len(x) * 3 // 4] for x in per_expert]
    stats = []
    for x in fits:
        st = statistics_of([x.float()], ("gram", "absmean"), w.shape[2])
        stats.append({**st.as_dict(), "rows": st.rows})
    r = 64
    errs = {}
    for method in ("svd", "svd-llm"):
        decs, few = decompose_experts(w, method, stats, 0.5, 0.01)
        assert not few
        errs[method] = []
        for e, (d, x) in enumerate(zip(decs, per_expert)):
            held_out = x[len(x) * 3 // 4:]
            u, v = d.factors(r)
            errs[method].append(float((held_out @ (w[e].double() - u @ v).T).norm() / (held_out @ w[e].double().T).norm()))
    assert all(len(x) * 3 // 4 > w.shape[2] and len(x) // 4 >= 64 for x in per_expert)  # K = 384 fit rows or more
    ratios = [a / b for a, b in zip(errs["svd-llm"], errs["svd"])]
    assert max(ratios) < 0.97 and sum(ratios) / len(ratios) < 0.9, ratios


@pytest.mark.fixtures
def test_tiny_mixtral_at_80_percent_splits_attention_and_experts(tmp_path):
    """svd-llm at 80 % of the attention and expert parameters (sequential, allocated, refit; 8 x 256 calibration
    tokens): expert weights split, the budget met, perplexity on 4 held-out windows within +20 % of dense (+5.3 %
    on 32 windows of 512 with 32 x 512 calibration tokens: benchmarks/lowrank_quality.py; 4 x 256 calibration
    tokens gave +31 %). 5-10 minutes on a contended 2-core CPU, most of it float64 SVDs (8 x 8 experts, twice)."""
    from llmcompress.testing.fixtures import corpus_windows, load_model, load_tokenizer, perplexity

    fixtures = _fixtures()
    tokenizer = load_tokenizer(fixtures)
    cal = corpus_windows(fixtures, tokenizer, "train.txt", 8, 256)
    windows = corpus_windows(fixtures, tokenizer, "validation.txt", 4, 256)
    options = {"lowering": "eager", "calibration": cal, "calibration_samples": 8, "calibration_seq_len": 256,
               "report": str(tmp_path / "r.json"), "passes": _passes(method="svd-llm", ratio=0.8)}
    dense = perplexity(load_model(fixtures, "tiny-mixtral"), windows)
    with torch.no_grad():
        split = perplexity(_compile(load_model(fixtures, "tiny-mixtral"), options), windows)
    rec = _record(tmp_path / "r.json")
    experts = [d["rank"] for d in rec["decisions"] if len(d["rank"].get("shape", ())) == 3]
    assert len(experts) == 2 * 4 and sum(d["rank"] != "dense" for d in experts) >= 4
    assert 0.8 - 0.002 < rec["stats"]["params_kept_fraction"] <= 0.8
    assert split < 1.2 * dense, (split, dense)
