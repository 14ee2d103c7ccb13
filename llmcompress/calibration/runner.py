"""Run a captured aten graph on calibration feeds, node by node, stopping at the nodes a caller asked about.

`run_sequential(gm, feeds, targets, quantize)`: at each target (a linear, a grouped matmul) it hands the node's
evaluated arguments of every chunk to `quantize`, which returns the compressed layer as a callable (or None to
keep the node); the rest of the graph then sees the compressed layer's outputs, so each layer is calibrated on the
errors of the ones before it (GPTQ's sequential mode). With `float_inputs` the unquantized graph runs beside it (the
float shadow run). `watch` nodes hand their outputs to `on_value` (hidden states, router logits). Values are freed
after their last use, and the run stops after the last node asked about. `calibration/service.py` is the API
passes use; this is its engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def run_sequential(gm: torch.fx.GraphModule, feeds: list[list[Any]], targets: Sequence[torch.fx.Node],
                   quantize: Callable[..., Callable[..., torch.Tensor] | None],
                   progress: Callable[[int], None] | None = None, float_inputs: bool = False,
                   watch: Sequence[torch.fx.Node] = (),
                   on_value: Callable[[torch.fx.Node, list[Any]], None] | None = None) -> None:
    """Run `gm` on every chunk in `feeds`, node by node; at each node of `targets` call `quantize`.

    `quantize(node, calls)` gets the node's evaluated (args, kwargs) for every chunk (args[0]: the activation;
    MoE grouped matmuls also need their expert offsets) and returns the quantized layer, called as
    layer(*args, **kwargs), whose outputs replace the node's for the rest of the run; None keeps the node.

    With `float_inputs`, the unquantized graph runs beside it (only the values that differ are kept twice), and
    `quantize(node, calls, float_inputs)` also gets what the activation is in the float model, per chunk (None
    where it is the same everywhere): a layer can then be fitted to the float model's outputs rather than to its
    own on inputs that already carry the earlier layers' errors. Rows match the float model's only where the
    graph keeps token order (not for expert-sorted rows, whose routing may differ).

    `on_value(node, values)` gets each `watch` node's value in every chunk, as the run computed it (after the
    layers quantized before it).
    """
    nodes = list(gm.graph.nodes)
    target_set, watch_set = set(targets), set(watch)
    if not target_set and not watch_set:
        return
    stop = max(i for i, n in enumerate(nodes) if n in target_set or n in watch_set)
    last_use: dict[torch.fx.Node, int] = {}
    for i, n in enumerate(nodes[: stop + 1]):
        for a in n.all_input_nodes:
            last_use[a] = i
    envs: list[dict[torch.fx.Node, Any]] = [{} for _ in feeds]
    # Float-model values of the nodes whose value differs from envs' (downstream of a quantized layer).
    shadows: list[dict[torch.fx.Node, Any]] = [{} for _ in feeds]
    placeholders = iter(range(len(feeds[0]) if feeds else 0))
    done = 0

    def float_call(node: torch.fx.Node, env: dict, shadow: dict, always: bool = False) -> None:
        """The node's float-model value, kept when it differs (a target's always does)."""
        if always or any(a in shadow for a in node.all_input_nodes):
            def look(a: torch.fx.Node) -> Any:
                return shadow[a] if a in shadow else env[a]
            shadow[node] = node.target(*torch.fx.node.map_arg(node.args, look),
                                       **torch.fx.node.map_arg(node.kwargs, look))

    with torch.no_grad():
        for i, node in enumerate(nodes[: stop + 1]):
            if node.op == "placeholder":
                k = next(placeholders)
                for env, feed in zip(envs, feeds):
                    env[node] = feed[k]
            elif node.op == "get_attr":
                value = _fetch_attr(gm, node.target)
                for env in envs:
                    env[node] = value
            elif node.op == "call_function":
                layer = None
                if node in target_set:
                    calls = [(torch.fx.node.map_arg(node.args, env.__getitem__),
                              torch.fx.node.map_arg(node.kwargs, env.__getitem__)) for env in envs]
                    if float_inputs:
                        act = node.args[0]
                        floats = [sh.get(act) for sh in shadows]
                        layer = quantize(node, calls, None if all(f is None for f in floats) else
                                         [c[0][0] if f is None else f for c, f in zip(calls, floats)])
                        del floats
                    else:
                        layer = quantize(node, calls)
                    del calls
                    done += 1
                    if progress is not None:
                        progress(done)
                for env, shadow in zip(envs, shadows):
                    args = torch.fx.node.map_arg(node.args, env.__getitem__)
                    kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                    if layer is not None:
                        if float_inputs:
                            float_call(node, env, shadow, always=True)
                        env[node] = layer(*args, **kwargs)
                    else:
                        env[node] = node.target(*args, **kwargs)
                        if float_inputs:
                            float_call(node, env, shadow)
                if node in watch_set and on_value is not None:
                    on_value(node, [env[node] for env in envs])
            for a in node.all_input_nodes:
                if last_use.get(a) == i:
                    for env, shadow in zip(envs, shadows):
                        env.pop(a, None)
                        shadow.pop(a, None)
