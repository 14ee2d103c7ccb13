"""Find transformers' softmax top-k MoE blocks in a captured graph: `find_blocks(gm, weights)`.

A block is matched from its router: `aten.linear(x, W (E, H))` on a frozen weight → (casts) → softmax over the E
logits → `aten.topk(k)` with k ≤ E, the top-k values optionally renormalised by their sum (`norm_topk_prob`; Mixtral
always). Its experts are the frozen 3-D weights `<block>.experts.gate_up_proj` (E, 2I, H) and
`<block>.experts.down_proj` (E, H, I) beside the router `<block>.gate`, read by a SiLU MLP whatever the experts
implementation runs them (eager loop, batched or grouped matmuls). A router without such experts is returned with
`why` set (left as it is, with a decision).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from llmcompress.passes.weights import FrozenWeights

aten = torch.ops.aten
_CASTS = (aten._to_copy.default, aten.view.default, aten.reshape.default, aten.clone.default)
_SOFTMAX = (aten._softmax.default, aten.softmax.int)
EXPERT_IDS = "llmcompress.moe_expert_ids"
"""Meta key on the router node of a block `moe-prune` sliced: the original id of each kept expert, by position."""
ORIGINALS = "llmcompress.moe_originals"
"""Meta key beside it: the attributes of the module's own router and expert weights the sliced ones came from."""


@dataclasses.dataclass
class MoEBlock:
    name: str
    """The block's module path (`model.layers.0.mlp`)."""
    router: torch.fx.Node
    """`aten.linear(x, W, b)`: x (T, H) is the block's input."""
    topk: torch.fx.Node
    values: torch.fx.Node | None
    """getitem 0 of the topk (the weights before renormalisation)."""
    indices: torch.fx.Node | None
    weights: torch.fx.Node | None
    """The routing weights the experts' outputs are scaled by (T, k): the renormalised values, or the values."""
    renormalize: bool
    k: int
    num_experts: int
    gate_up: torch.fx.Node | None = None
    down: torch.fx.Node | None = None
    why: str | None = None
    """Why the block cannot be rewritten (None: it can)."""
    expert_ids: list[int] = dataclasses.field(default_factory=list)
    """The original id of each expert, by position (`range(E)` unless `moe-prune` sliced the block)."""
    originals: list[str] = dataclasses.field(default_factory=list)
    """Attributes of the module's own weights the block's sliced ones came from (empty: not sliced)."""


def _through_casts(node: object) -> object:
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    return node


def _getitem(node: torch.fx.Node, i: int) -> torch.fx.Node | None:
    for u in node.users:
        if u.target is operator.getitem and u.args[1] == i:
            return u
    return None


def _renormalised(values: torch.fx.Node) -> torch.fx.Node | None:
    """div(values, sum(values, -1, keepdim)) among the values' users, else None."""
    for u in values.users:
        if u.target is aten.div.Tensor and u.args[0] is values and isinstance(u.args[1], torch.fx.Node):
            s = u.args[1]
            if s.target is aten.sum.dim_IntList and s.args[0] is values and list(s.args[1]) in ([-1], [1]):
                return u
    return None


def _reaches_silu(node: torch.fx.Node, depth: int = 6) -> bool:
    frontier = [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        if any(u.target is aten.silu.default for u in frontier):
            return True
    return False


def find_blocks(gm: torch.fx.GraphModule, weights: FrozenWeights) -> list[MoEBlock]:
    """Every softmax top-k router of the graph, in graph order, with its experts (or why it has none usable)."""
    by_name = {weights.name(n): n for n in gm.graph.find_nodes(op="get_attr") if weights.is_constant(n)}
    blocks = []
    for topk in gm.graph.find_nodes(op="call_function", target=aten.topk.default):
        k = topk.args[1]
        dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
        largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
        soft = _through_casts(topk.args[0])
        if not (isinstance(soft, torch.fx.Node) and soft.target in _SOFTMAX and largest and isinstance(k, int)):
            continue
        router = _through_casts(soft.args[0])
        if not (isinstance(router, torch.fx.Node) and router.target is aten.linear.default
                and weights.is_constant(router.args[1])):
            continue
        w_val = router.args[1].meta["val"]
        n_exp = w_val.shape[0]
        # k == E: every expert on every token (a block moe-prune sliced to its top-k).
        if w_val.dim() != 2 or dim not in (-1, soft.meta["val"].dim() - 1) or soft.args[1] not in (-1, 1) or k > n_exp:
            continue
        # `<block>.gate.weight` (or a derived `<block>.gate.weight_pruned`): the block is two levels up.
        name = (weights.name(router.args[1]) or router.args[1].name).rsplit(".", 2)[0]
        values, indices = _getitem(topk, 0), _getitem(topk, 1)
        renorm = values is not None and _renormalised(values)
        block = MoEBlock(name, router, topk, values, indices, renorm or values, bool(renorm), k, n_exp,
                         expert_ids=list(router.meta.get(EXPERT_IDS, range(n_exp))),
                         originals=list(router.meta.get(ORIGINALS, ())))
        blocks.append(block)
        gate_up, down = by_name.get(f"{name}.experts.gate_up_proj"), by_name.get(f"{name}.experts.down_proj")
        h = w_val.shape[1]
        if gate_up is None or down is None:
            block.why = f"no 3-D experts {name}.experts.gate_up_proj / down_proj beside the router"
        elif (gate_up.meta["val"].dim() != 3 or down.meta["val"].dim() != 3 or gate_up.meta["val"].shape[0] != n_exp
              or gate_up.meta["val"].shape[2] != h or tuple(down.meta["val"].shape[:2]) != (n_exp, h)
              or gate_up.meta["val"].shape[1] != 2 * down.meta["val"].shape[2]):
            block.why = (f"expert shapes {tuple(gate_up.meta['val'].shape)} / {tuple(down.meta['val'].shape)} are "
                         f"not (E={n_exp}, 2I, H={h}) / (E, H, I)")
        elif not _reaches_silu(gate_up):
            block.why = "the experts' activation is not SiLU"
        elif values is None or indices is None:
            block.why = "the top-k's values or indices are not used"
        else:
            block.gate_up, block.down = gate_up, down
    return blocks
