"""The cascade's compiled form: `split_cascade(gm, decoder, plan, ...)` cuts a decode graph into pieces that the
backend lowers one by one (`backend/branches.py`) and chooses between at run time.

For kept exits E_1 < … < E_k:
* segment j computes layers E_{j-1} … E_j − 1 (their cache writes included) and exit j's gate, a 0-d bool: every row
  confident;
* skip j fills the key/value slots of layers E_j … L − 1 for the token from the exit state (each layer's own
  input norm → k_proj / v_proj → rotary → cache write, copied from the graph: the backward slice of the layer's
  writes, with the layer's input replaced by `CascadePlan.fill_state`) and returns the exit's logits: the graph's
  own final norm + LM head of the translation A_E h + b_E;
* rest runs what is left of the graph (layers E_k … L − 1, the norm and the head).
At run time segment 1 runs; if its gate is open skip 1 returns, else segment 2 runs, and so on; rest runs when no
gate opened. Each piece takes the graph inputs and the values earlier pieces computed that it reads; a piece writes
only the cache inputs of its own layers, and no later piece reads an input an earlier one wrote (checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx

from llmcompress.exit_gates import Gate, gate_features
from llmcompress.passes.base import SPLIT_KEY
from llmcompress.passes.early_exit.structure import DecoderGraph, layer_of

aten = torch.ops.aten
META_KEY = SPLIT_KEY
"""`gm.meta[META_KEY]`: the `Branches` of a graph the pass split; the backend's lowering runs them, and the passes
after `early-exit` (the Triton lowering's fusions) run on each piece."""


def gate_open(before: torch.Tensor, after: torch.Tensor, exit_logits: torch.Tensor | None, weight: torch.Tensor,
              bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, hidden_weight: torch.Tensor | None,
              hidden_bias: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """0-d bool: every row's gate score ≥ threshold (`exit_gates.Gate.score` on layer E's input and output).
    One graph node: the eager lowering calls it, Inductor's re-trace decomposes it into aten ops."""
    x = (gate_features(before, after, exit_logits) - mean) / std
    if hidden_weight is not None:
        x = torch.nn.functional.gelu(x @ hidden_weight + hidden_bias)
    return (torch.sigmoid(x @ weight + bias) >= threshold).all()


@dataclasses.dataclass
class Piece:
    """One lowered part: `gm` takes the values named `inputs` (graph placeholders or earlier pieces' values) and
    returns those named `outputs` (a segment) or the graph's outputs (a skip or the rest)."""

    gm: torch.fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    fn: Callable[[list], Any] | None = None

    def example_inputs(self) -> list[Any]:
        return [n.meta["val"] for n in self.gm.graph.find_nodes(op="placeholder")]


@dataclasses.dataclass
class Branches:
    """What the backend lowers instead of the whole graph. counts: decode steps that left at each exit
    ({E: steps}, and 0: steps through every layer), filled at run time."""

    placeholders: list[str]
    exits: list[int]
    segments: list[Piece]
    skips: list[Piece]
    rest: Piece
    num_layers: int
    signature: str
    counts: dict[int, int] = dataclasses.field(default_factory=dict)
    plan: Any = None
    """The `exit_gates.CascadePlan` the pieces run (None for a forced gate with the logit lens)."""

    def pieces(self) -> list[Piece]:
        return [*self.segments, *self.skips, self.rest]

    def graphs(self) -> list[torch.fx.GraphModule]:
        return [p.gm for p in self.pieces()]

    def skip_fraction(self) -> float:
        """Share of decoder-layer evaluations skipped over the steps run so far."""
        steps = sum(self.counts.values())
        skipped = sum(c * (self.num_layers - e) for e, c in self.counts.items() if e)
        return skipped / max(steps * self.num_layers, 1)


def graph_signature(gm: torch.fx.GraphModule) -> str:
    """The graph the pieces were cut from: lowering refuses pieces of a graph a later pass changed."""
    return hashlib.sha256(str(gm.graph).encode()).hexdigest()[:16]


@dataclasses.dataclass
class ExitParts:
    """The constants of one kept exit: translation (A, b), the gate's (None: forced), fill maps {layer: (W, b)},
    the temperature the exit's returned logits are divided by (`CascadePlan.output_logits`; the gate reads them
    untempered, as it was fitted)."""

    layer: int
    translation: tuple[torch.Tensor, torch.Tensor] | None
    gate: Gate | None
    forced: bool | None
    fill_maps: dict[int, tuple[torch.Tensor, torch.Tensor]]
    temperature: float = 1.0


class UnsupportedGraph(Exception):
    """The graph cannot be split as the cascade needs; the message is the reason (the pass leaves it alone)."""


def closure(targets: Iterable[torch.fx.Node], stop: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """call_function nodes the targets need, not looking past `stop`."""
    out: set[torch.fx.Node] = set()
    todo = [t for t in targets if t not in stop]
    while todo:
        n = todo.pop()
        if n in out or n in stop or n.op != "call_function":
            continue
        out.add(n)
        todo.extend(a for a in n.all_input_nodes if a not in stop)
    return out


def _downstream(start: torch.fx.Node) -> set[torch.fx.Node]:
    out, todo = set(), [start]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in out:
                out.add(u)
                todo.append(u)
    return out


class PieceBuilder:
    """Builds one piece's graph: original nodes copied in graph order, inputs as placeholders (moved first)."""

    def __init__(self, gm: torch.fx.GraphModule, fake_mode: Any, available: set[torch.fx.Node]):
        self.gm, self.fake_mode, self.available = gm, fake_mode, available
        self.graph = torch.fx.Graph()
        self.env: dict[torch.fx.Node, torch.fx.Node] = {}
        self.inputs: list[str] = []
        self._placeholders: list[torch.fx.Node] = []

    def input(self, name: str, like: Any) -> torch.fx.Node:
        ph = self.graph.placeholder(name)
        ph.meta["val"] = like
        self.inputs.append(name)
        self._placeholders.append(ph)
        return ph

    def value(self, node: torch.fx.Node) -> torch.fx.Node:
        if node in self.env:
            return self.env[node]
        if node.op == "get_attr":
            new = self.graph.get_attr(node.target)
            new.meta.update(node.meta)
        elif node.op == "placeholder" or node in self.available:
            new = self.input(node.name, node.meta.get("val"))
        else:
            raise UnsupportedGraph(f"node {node.name} is needed before it is computed")
        self.env[node] = new
        return new

    def copy(self, nodes: Iterable[torch.fx.Node], order: dict[torch.fx.Node, int]) -> None:
        for n in sorted(nodes, key=order.__getitem__):
            if n not in self.env:
                self.env[n] = self.graph.node_copy(n, self.value)

    def constant(self, tensor: torch.Tensor, hint: str) -> torch.fx.Node:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        base = "_early_exit_" + hint
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        with unset_fake_temporarily():
            self.gm.register_buffer(name, tensor, persistent=False)
            fake = self.fake_mode.from_tensor(tensor, static_shapes=True)
        node = self.graph.get_attr(name)
        node.meta["val"] = fake
        return node

    def call(self, target: Callable, args: tuple, like: torch.fx.Node | None = None) -> torch.fx.Node:
        node = self.graph.call_function(target, args)

        def fake(a: Any) -> Any:
            return a.meta["val"] if isinstance(a, torch.fx.Node) else a

        with self.fake_mode:
            node.meta["val"] = target(*torch.fx.node.map_aggregate(args, fake))
        if like is not None:
            for k in ("nn_module_stack", "stack_trace"):
                if k in like.meta:
                    node.meta[k] = like.meta[k]
        return node

    def finish(self, outputs: Sequence[Any]) -> torch.fx.GraphModule:
        self.graph.output(tuple(outputs))
        placeholders = set(self._placeholders)
        anchor = next(n for n in self.graph.nodes if n not in placeholders)  # the output node at the latest
        for ph in self._placeholders:  # in order, each right before the first other node
            anchor.prepend(ph)
        self.graph.lint()
        gm = torch.fx.GraphModule(self.gm, self.graph)
        return gm


def split_cascade(gm: torch.fx.GraphModule, dg: DecoderGraph, exits: Sequence[ExitParts], fake_mode: Any
                  ) -> Branches:
    """The pieces of `gm` for the kept exits (ascending); raises `UnsupportedGraph` with the reason."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    output = nodes[-1]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    layers = [e.layer for e in exits]
    if layers != sorted(set(layers)) or not layers or layers[0] < 1 or layers[-1] >= dg.num_layers:
        raise UnsupportedGraph(f"exits {layers}: expected ascending layers in [1, {dg.num_layers - 1}]")

    # Node sets: segment j computes what exit j's state and the cache writes of the layers before it need.
    computed: set[torch.fx.Node] = set()
    seg_sets: list[set[torch.fx.Node]] = []
    for e in layers:
        targets = [dg.states[e], dg.states[e - 1], *(w for i in range(e) for w in dg.writes[i])]
        s = closure(targets, computed)
        seg_sets.append(s)
        computed |= s
    rest_set = {n for n in nodes if n.op == "call_function" and n not in computed}

    segments, skips = [], []
    available: set[torch.fx.Node] = set()
    for j, ex in enumerate(exits):
        e = ex.layer
        b = PieceBuilder(gm, fake_mode, set(available))
        b.copy(seg_sets[j], order)
        available |= seg_sets[j]
        h = b.value(dg.states[e])
        exit_logits = None
        if ex.gate is None:
            flag = b.call(aten.scalar_tensor.default, (1.0 if ex.forced else 0.0,))  # forced: 1 open, 0 closed
        else:
            g = ex.gate
            if g.logits:
                exit_logits = _exit_logits(b, gm, dg, ex, h, order, available)
            consts = [b.constant(g.weight, f"gate{e}_w"), g.bias, b.constant(g.mean, f"gate{e}_mean"),
                      b.constant(g.std, f"gate{e}_std"),
                      None if g.hidden_weight is None else b.constant(g.hidden_weight, f"gate{e}_w1"),
                      None if g.hidden_bias is None else b.constant(g.hidden_bias, f"gate{e}_b1"), g.threshold]
            flag = b.call(gate_open, (b.value(dg.states[e - 1]), h, exit_logits, consts[0], consts[1], *consts[2:]),
                          like=dg.states[e])
        segments.append(b)  # finished once every later piece's inputs are known
        segments[-1]._flag = flag  # type: ignore[attr-defined]
        segments[-1]._exit_logits = exit_logits  # type: ignore[attr-defined]
        skips.append(_skip(gm, dg, ex, fake_mode, set(available), order, output, exit_logits is not None))

    rb = PieceBuilder(gm, fake_mode, set(available))
    rb.copy(rest_set, order)
    rest = rb.finish(torch.fx.node.map_arg(output.args[0], rb.value)
                     if isinstance(output.args[0], (tuple, list)) else (rb.value(output.args[0]),))
    rest_piece = Piece(rest, rb.inputs, [])
    skip_pieces = [Piece(g, ins, []) for g, ins in skips]

    # Each segment returns what later pieces read of its values, then its exit logits (logits gate), then its flag.
    seg_pieces: list[Piece] = []
    names_by_seg = [{n.name for n in s} for s in seg_sets]
    for j, b in enumerate(segments):
        wanted = set(rest_piece.inputs)
        for k in range(j, len(exits)):
            wanted |= set(skip_pieces[k].inputs)
            if k > j:
                wanted |= set(segments[k].inputs)
        outs = sorted((n for n in wanted if n in names_by_seg[j]), key=lambda n: order[_by_name(nodes, n)])
        values = [b.env[_by_name(nodes, n)] for n in outs]
        extra = []
        if b._exit_logits is not None:  # type: ignore[attr-defined]
            values.append(b._exit_logits)  # type: ignore[attr-defined]
            extra.append(f"_exit_logits_{exits[j].layer}")
        values.append(b._flag)  # type: ignore[attr-defined]
        extra.append(f"_gate_{exits[j].layer}")
        seg_pieces.append(Piece(b.finish(values), b.inputs, [*outs, *extra]))

    branches = Branches([p.name for p in placeholders], layers, seg_pieces, skip_pieces, rest_piece, dg.num_layers,
                        graph_signature(gm))
    _check_writes(branches)
    return branches


def _by_name(nodes: list[torch.fx.Node], name: str) -> torch.fx.Node:
    return next(n for n in nodes if n.name == name)


def _exit_logits(b: PieceBuilder, gm: torch.fx.GraphModule, dg: DecoderGraph, ex: ExitParts, h: torch.fx.Node,
                 order: dict[torch.fx.Node, int], available: set[torch.fx.Node]) -> torch.fx.Node:
    """The graph's final norm + LM head on the exit's translation A_E h + b_E, copied into the piece."""
    last = dg.states[-1]
    head = closure([dg.logits], {last} | available)
    after_last = _downstream(last)
    beyond = _downstream(dg.states[ex.layer])
    leak = sorted(n.name for n in head if n in beyond and n not in after_last)
    if leak:
        raise UnsupportedGraph(f"the final norm + LM head read more than the last layer's output ({', '.join(leak[:3])})")
    if ex.translation is None:
        translated = h
    else:
        w, bias = ex.translation
        translated = b.call(aten.linear.default, (h, b.constant(w, f"exit{ex.layer}_a"),
                                                  b.constant(bias, f"exit{ex.layer}_b")), like=dg.states[ex.layer])
    b.env[last] = translated
    b.copy(head, order)
    out = b.env[dg.logits]
    del b.env[last]
    for n in head:
        del b.env[n]
    return out


def _skip(gm: torch.fx.GraphModule, dg: DecoderGraph, ex: ExitParts, fake_mode: Any, available: set[torch.fx.Node],
          order: dict[torch.fx.Node, int], output: torch.fx.Node, logits_given: bool) -> tuple[torch.fx.GraphModule,
                                                                                             list[str]]:
    """Skip piece of exit `ex`: the skipped layers' K/V slots from the exit state, then the exit's logits."""
    e = ex.layer
    b = PieceBuilder(gm, fake_mode, available)
    h = b.value(dg.states[e])
    beyond = _downstream(dg.states[e])
    for i in range(e, dg.num_layers):
        stop = {dg.states[i]} | available
        kv = closure(dg.writes[i], stop)
        down = _downstream(dg.states[i])
        leak = sorted(n.name for n in kv if (n in beyond and n not in down) or layer_of(n) not in (None, i))
        if leak:
            raise UnsupportedGraph(f"decoder layer {i}'s cache writes read more than its input ({', '.join(leak[:3])} "
                                   "read values of other layers): its K/V slot cannot be filled from the exit state")
        fill = ex.fill_maps.get(i)
        b.env[dg.states[i]] = h if fill is None else b.call(
            aten.linear.default, (h, b.constant(fill[0], f"fill{e}_{i}_w"), b.constant(fill[1], f"fill{e}_{i}_b")),
            like=dg.states[i])
        b.copy(kv, order)
        for n in kv:  # the next layer's slice copies its own nodes (views shared by layers are recomputed)
            if not any(w is n for w in dg.writes[i]):
                del b.env[n]
        if dg.states[i] is not dg.states[e]:
            del b.env[dg.states[i]]
    if logits_given:
        logits = b.input(f"_exit_logits_{e}", dg.logits.meta["val"])
    else:
        logits = _exit_logits(b, gm, dg, ex, h, order, available)
    if ex.temperature != 1.0:
        logits = b.call(aten.div.Tensor, (logits, ex.temperature), like=dg.logits)
    outs = output.args[0]
    result = (logits,) if not isinstance(outs, (tuple, list)) else tuple(logits for _ in outs)
    return b.finish(result), b.inputs


def _check_writes(branches: Branches) -> None:
    """A piece writes only inputs no later piece on any path reads."""
    def written(p: Piece) -> set[str]:
        return {n.args[0].name for n in p.gm.graph.nodes if n.target == aten.copy_.default}

    paths = [[*branches.segments[: j + 1], branches.skips[j]] for j in range(len(branches.exits))]
    paths.append([*branches.segments, branches.rest])
    for path in paths:
        for k, p in enumerate(path):
            w = written(p)
            for later in path[k + 1:]:
                clash = w & set(later.inputs)
                if clash:
                    raise UnsupportedGraph(f"inputs {sorted(clash)} are written by one piece and read by a later one")
