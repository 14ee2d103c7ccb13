"""`Calibration`: one graph's calibration data and every run on it, the one API passes calibrate through
(`ctx.calibration`, built by the backend for each graph from options `calibration`, `tokenizer`,
`calibration_samples` and `calibration_seq_len`).

What a pass can ask for:
* `feeds()`: the graph's inputs per chunk (`calibration/feeds.py`), or why this graph cannot be fed;
* `run_sequential(gm, targets, on_target, float_shadow=...)`: the graph runs chunk by chunk, node by node; at each
  target `on_target(TargetInputs)` sees the target's inputs (after the targets compressed before it) and returns
  the compressed layer, which the rest of the run uses (or None to keep the node); `known` replacements (layers a
  pass found cached) stand in for theirs without `on_target`. `TargetInputs` streams the
  activations per chunk, padding rows left out, and accumulates statistics (`calibration/stats.py`: XᵀX,
  Xᵀ(X - X_float), per-channel max / mean / squared norms) once per activation: targets reading the same value
  (q, k and v; gate and up) share them. With `float_shadow` the float model runs beside it and each target also
  sees its float-model input;
* `observe(gm, statistics=..., hidden_states=..., routing=...)`, or one of `statistics`, `hidden_states`,
  `routing`: one run of the graph as it is, for statistics at chosen nodes' inputs, values of chosen nodes, and
  MoE routing counts (rows per expert, from a grouped matmul's offsets). Results are kept per graph state, so
  passes that ask for the same thing on the same graph share one run.
The data is loaded (tokenized) once per process for the same option values; `fingerprint` hashes it for the keys
of calibrated weights.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from llmcompress.calibration.data import CalibrationData, fingerprint, load_calibration
from llmcompress.calibration.feeds import Feeds, graph_feeds
from llmcompress.calibration.runner import run_sequential
from llmcompress.calibration.stats import Statistics
from llmcompress.errors import OptionError

# (source, tokenizer, samples, seq_len) of recently loaded data -> the data: graphs of one compile (and recompiles)
# load it once. Identity-keyed, with the tensor version so an in-place change reloads.
_LOADED: collections.OrderedDict[tuple, tuple[Any, Any, CalibrationData]] = collections.OrderedDict()
_LOADED_MAX = 4


def _version(x: Any) -> int:
    return x._version if isinstance(x, torch.Tensor) and not x.is_inference() else 0


def _load(source: Any, tokenizer: Any, samples: int, seq_len: int) -> CalibrationData:
    key = (id(source), _version(source), id(tokenizer), samples, seq_len)
    hit = _LOADED.get(key)
    if hit is not None and hit[0] is source and hit[1] is tokenizer:
        _LOADED.move_to_end(key)
        return hit[2]
    data = load_calibration(source, tokenizer, samples, seq_len)
    _LOADED[key] = (source, tokenizer, data)
    while len(_LOADED) > _LOADED_MAX:
        _LOADED.popitem(last=False)
    return data


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(rows, K) of an activation (..., K): the real tokens' rows when the activation is laid out like the mask."""
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def _offsets(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The expert offsets of a grouped matmul's call (`_grouped_mm(x, w, offs)`, transformers' fallback)."""
    return kwargs.get("offs", args[2] if len(args) > 2 else None)


class TargetInputs:
    """What one target receives in a run: its evaluated arguments per chunk and statistics of its activation."""

    def __init__(self, node: torch.fx.Node, calls: list[tuple[tuple, dict]], float_inputs: list[torch.Tensor] | None,
                 masks: list[torch.Tensor | None], shared: dict[Any, dict[str, Any]]) -> None:
        self.node = node
        self.calls = calls
        """(args, kwargs) of the node in every chunk, as the run evaluated them."""
        self.float_inputs = float_inputs
        """The activation (args[0]) in the float model, per chunk; None when not asked for or equal everywhere."""
        self._masks = masks
        self._shared = shared

    @property
    def inputs(self) -> list[torch.Tensor]:
        """The activation (args[0]) per chunk, as the graph lays it out."""
        return [args[0] for args, _ in self.calls]

    def offsets(self) -> list[torch.Tensor]:
        """Per chunk, a grouped matmul's expert offsets (cumulative row ends, one per expert)."""
        return [_offsets(args, kwargs) for args, kwargs in self.calls]

    def rows(self) -> list[torch.Tensor]:
        """The activation per chunk as (rows, K), the padding's rows left out."""
        return [_rows(x, m) for x, m in zip(self.inputs, self._masks)]

    def float_rows(self) -> list[torch.Tensor] | None:
        """`rows()` of the float model's activation; None as `float_inputs`."""
        if self.float_inputs is None:
            return None
        return [_rows(x, m) for x, m in zip(self.float_inputs, self._masks)]

    def statistics(self, *kinds: str) -> dict[str, torch.Tensor]:
        """{kind: tensor} of `stats.Statistics` over `rows()` (`cross` against `float_rows()`, zero without them),
        computed once per activation and run: every target reading the same value shares them."""
        act = self.node.args[0]
        key = (act, self.float_inputs is not None)
        have = self._shared.setdefault(key, {})
        missing = [k for k in kinds if k not in have]
        if missing:
            x = self.inputs[0]
            stats = Statistics(x.shape[-1], missing, device=x.device)
            floats = self.float_rows() or [None] * len(self.calls)
            for rows, f in zip(self.rows(), floats):
                stats.add(rows, f)
            have.update(stats.as_dict())
            have["rows"] = stats.rows
        return {k: have[k] for k in kinds}


@dataclasses.dataclass
class Observed:
    """What `Calibration.observe` returns: per node asked about."""

    statistics: dict[torch.fx.Node, dict[str, torch.Tensor]]
    """Statistics of the node's activation (args[0]) over every chunk (and "rows": their count)."""
    hidden_states: dict[torch.fx.Node, list[Any]]
    """The node's value in every chunk."""
    routing: dict[torch.fx.Node, torch.Tensor]
    """A grouped matmul's rows per expert (E,) int64, summed over the chunks."""


class Calibration:
    """A graph's calibration: the data (loaded on first use), its feeds, and the runs passes ask for."""

    def __init__(self, source: Any, tokenizer: Any = None, samples: int = 128, seq_len: int = 512, *,
                 example_inputs: Sequence[Any] = (), input_names: Sequence[str] = (),
                 scalars: dict[int, torch.Tensor] | None = None) -> None:
        self.source = source
        self.scalars = dict(scalars or {})
        """{input position: value}: the real 0-d inputs at compile time (a model's float attribute Dynamo lifts as
        an input under dynamic shapes, e.g. the rotary embedding's attention scaling), fed to every chunk."""
        self.tokenizer = tokenizer
        self.samples = samples
        self.seq_len = seq_len
        self.example_inputs = list(example_inputs)
        self.input_names = list(input_names)
        self._data: CalibrationData | None = None
        self._fingerprint: str | None = None
        self._feeds: Feeds | str | None = None
        # (graph state, what, node name) -> result of an earlier observe run on this graph.
        self._observed: dict[tuple, Any] = {}

    @property
    def available(self) -> bool:
        """Whether the user gave calibration data."""
        return self.source is not None

    def require(self, purpose: str) -> None:
        """Raises `OptionError` when there is no calibration data; `purpose` says who needs it."""
        if not self.available:
            raise OptionError(f"{purpose}: give options['calibration'] (token ids, a datasets.Dataset, a text file "
                              "path, with options['tokenizer'] for text, or a list of dicts of model inputs)")

    @property
    def data(self) -> CalibrationData:
        """Token windows (n, L), or rows of the model's inputs (`calibration/data.py`)."""
        if self._data is None:
            self.require("calibration")
            self._data = _load(self.source, self.tokenizer, self.samples, self.seq_len)
        return self._data

    @property
    def fingerprint(self) -> str:
        """A short hash of the data: part of the key of every weight calibrated on it."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.data)
        return self._fingerprint

    def feeds(self) -> Feeds | str:
        """The graph's inputs per chunk, or the reason the graph cannot be fed (a decode step, a graph after a
        graph break, an input neither the data holds nor the chunk's sizes give)."""
        if self._feeds is None:
            self._feeds = graph_feeds(self.example_inputs, self.input_names, self.data, self.scalars)
        return self._feeds

    def _fed(self) -> Feeds:
        feeds = self.feeds()
        if isinstance(feeds, str):
            raise OptionError(f"calibration cannot feed this graph: {feeds}")
        return feeds

    # --- runs ------------------------------------------------------------------------------------------------------

    def run_sequential(self, gm: torch.fx.GraphModule, targets: Sequence[torch.fx.Node],
                       on_target: Callable[[TargetInputs], Callable[..., Any] | None], *, float_shadow: bool = False,
                       progress: Callable[[int], None] | None = None, watch: Sequence[torch.fx.Node] = (),
                       on_value: Callable[[torch.fx.Node, list[Any]], None] | None = None,
                       known: Mapping[torch.fx.Node, Callable[..., Any]] | None = None) -> None:
        """Run `gm` on the feeds; at each target (in graph order) `on_target(TargetInputs)` returns the target's
        replacement, called with the node's arguments for the rest of the run (None keeps the node).

        float_shadow: run the float model beside it, so that `TargetInputs.float_inputs` holds each target's input
        in the float model (where it differs). Statistics are shared between targets of the same activation.
        watch / on_value: `on_value(node, values)` gets each watched node's value in every chunk, after the
        replacements before it (e.g. the logits, to price a rewrite in loss).
        known: replacements already at hand (a pass's derived weights cached by an earlier compile, or its layers
        compressed without calibration), applied where they stand without `on_target`: the targets after them then
        see the inputs they would see had nothing been cached, not the float model's (a cache hit must not change what the layers after it are fitted to).
        progress(i): after the i-th target's `on_target`.
        """
        feeds = self._fed()
        shared: dict[Any, dict[str, Any]] = {}
        asked = set(targets)
        known = {n: f for n, f in (known or {}).items() if n not in asked}
        if known:
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            last = max((order[n] for n in [*targets, *watch]), default=-1)
            targets = sorted([*targets, *(n for n in known if order[n] < last)], key=order.__getitem__)
        done = 0

        def quantize(node: torch.fx.Node, calls: list, float_inputs: list | None = None) -> Any:
            nonlocal done
            if node in known:
                return known[node]
            layer = on_target(TargetInputs(node, calls, float_inputs, feeds.masks, shared))
            done += 1
            if progress is not None:
                progress(done)
            return layer

        run_sequential(gm, feeds.args, targets, quantize, float_inputs=float_shadow, watch=watch, on_value=on_value)

    def observe(self, gm: torch.fx.GraphModule, *, statistics: dict[torch.fx.Node, Iterable[str]] | None = None,
                hidden_states: Iterable[torch.fx.Node] = (), routing: Iterable[torch.fx.Node] = ()) -> Observed:
        """One run of `gm` as it is (nothing replaced) for statistics of chosen nodes' activations ({node: kinds}),
        values of chosen nodes, and rows per expert of chosen grouped matmuls. What an earlier call on the same graph
        state computed is reused, and nothing runs when everything is known."""
        state = _graph_state(gm)
        statistics = {n: tuple(k) for n, k in (statistics or {}).items()}
        hidden_states, routing = list(hidden_states), list(routing)
        out = Observed({}, {}, {})
        want_stats: dict[torch.fx.Node, tuple[str, ...]] = {}
        for node, kinds in statistics.items():
            have = self._observed.get((state, "statistics", node.name), {})
            missing = tuple(k for k in kinds if k not in have)
            if missing:
                want_stats[node] = missing
        want_hidden = [n for n in hidden_states if (state, "hidden", n.name) not in self._observed]
        want_routing = [n for n in routing if (state, "routing", n.name) not in self._observed]
        if want_stats or want_hidden or want_routing:
            self._run_observe(gm, state, want_stats, want_hidden, want_routing)
        for node, kinds in statistics.items():
            have = self._observed[(state, "statistics", node.name)]
            out.statistics[node] = {k: have[k] for k in (*kinds, "rows")}
        out.hidden_states = {n: self._observed[(state, "hidden", n.name)] for n in hidden_states}
        out.routing = {n: self._observed[(state, "routing", n.name)] for n in routing}
        return out

    def _run_observe(self, gm: torch.fx.GraphModule, state: str, stats: dict[torch.fx.Node, tuple[str, ...]],
                     hidden: list[torch.fx.Node], routing: list[torch.fx.Node]) -> None:
        feeds = self._fed()
        shared: dict[Any, dict[str, Any]] = {}
        routing_set = set(routing)

        def at_target(node: torch.fx.Node, calls: list) -> None:
            inputs = TargetInputs(node, calls, None, feeds.masks, shared)
            if node in stats:
                have = self._observed.setdefault((state, "statistics", node.name), {})
                have.update(inputs.statistics(*stats[node]))
                have["rows"] = shared[(node.args[0], False)]["rows"]
            if node in routing_set:
                counts = None
                for offs in inputs.offsets():
                    if offs is None:
                        raise ValueError(f"calibration routing: node {node.name} has no expert offsets")
                    ends = offs.to(torch.int64).cpu()
                    c = torch.diff(ends, prepend=ends.new_zeros(1))
                    counts = c if counts is None else counts + c
                self._observed[(state, "routing", node.name)] = counts

        def at_value(node: torch.fx.Node, values: list) -> None:
            self._observed[(state, "hidden", node.name)] = values

        run_sequential(gm, feeds.args, list(dict.fromkeys([*stats, *routing])), at_target, watch=hidden,
                       on_value=at_value)

    def statistics(self, gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node], kinds: Iterable[str]
                   ) -> dict[torch.fx.Node, dict[str, torch.Tensor]]:
        """Statistics (`stats.KINDS`) of each node's activation (args[0]) in the graph as it is, over all chunks."""
        kinds = tuple(kinds)
        return self.observe(gm, statistics={n: kinds for n in nodes}).statistics

    def hidden_states(self, gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]
                      ) -> dict[torch.fx.Node, list[Any]]:
        """Each node's value in every chunk (hold few: each is a full activation per chunk)."""
        return self.observe(gm, hidden_states=nodes).hidden_states

    def routing(self, gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]) -> dict[torch.fx.Node, torch.Tensor]:
        """Rows routed to each expert (E,) by each grouped matmul node, over all chunks."""
        return self.observe(gm, routing=nodes).routing


def _graph_state(gm: torch.fx.GraphModule) -> str:
    """A hash of the graph and of its constants' identities and versions: what an observe run saw stays valid until
    a pass rewrites the graph or changes a constant in place."""
    h = hashlib.sha256(str(gm.graph).encode())
    for node in gm.graph.find_nodes(op="get_attr"):
        obj: Any = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        h.update(f"{node.target}:{id(obj)}:{_version(obj)};".encode())
    return h.hexdigest()[:16]
