"""Run a captured aten graph on calibration tokens, node by node, quantizing linears as it reaches them.

Entry points: `calibration_feeds(gm, ctx, windows)` builds the graph's inputs for each chunk of calibration tokens
(or says why this graph cannot be fed from token ids: a decode step, the hidden states after a graph break, an input
it cannot derive); `run_sequential(gm, feeds, targets, quantize)` runs the graph. At each target linear it hands the
layer's input activations of every chunk to `quantize`, which returns the quantized layer as a callable; the rest
of the graph then sees the quantized layer's outputs, so each layer is calibrated on the errors of the ones before
it (GPTQ's sequential mode). Values are freed after their last use, and the run stops after the last target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx

# Windows per chunk when the batch dimension is dynamic: bounds the activation memory of one node's evaluation.
_DYNAMIC_BATCH = 8


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _ids_position(names: Sequence[str], values: Sequence[Any]) -> int | None:
    ints = [i for i, v in enumerate(values)
            if isinstance(v, torch.Tensor) and v.dtype in (torch.int64, torch.int32) and v.dim() == 2]
    named = [i for i in ints if "input_ids" in names[i]]
    if named:
        return named[0]
    return ints[0] if len(ints) == 1 else None


def _expr(x: Any) -> sympy.Expr:
    return sympy.sympify(x.node.expr) if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def calibration_feeds(gm: torch.fx.GraphModule, ctx: Any, windows: torch.Tensor
                      ) -> tuple[list[list[Any]], int] | str:
    """(per-chunk argument lists, tokens fed) for `gm`'s placeholders, or the reason the graph cannot be fed.

    windows: (n, L) int64 calibration tokens. A dynamic sequence dimension takes windows of L tokens; a static one
    of S tokens takes the same tokens cut into S-token windows.
    """
    values = list(ctx.example_inputs)
    names = list(getattr(ctx, "input_names", None) or [f"input {i}" for i in range(len(values))])
    pos = _ids_position(names, values)
    if pos is None:
        return "no input is a (batch, seq) tensor of token ids (the graph follows a graph break, or takes " \
               "embeddings)"
    ids = values[pos]
    batch_e, seq_e = _expr(ids.shape[0]), _expr(ids.shape[1])
    stream = windows.reshape(-1)
    if seq_e.is_number:
        seq = int(seq_e)
        if seq == 1:
            return "the graph is a decode step (one token per sequence)"
    else:
        seq = windows.shape[1]
    batch = int(batch_e) if batch_e.is_number else _DYNAMIC_BATCH
    rows = stream.numel() // seq
    if rows == 0:
        return f"the graph takes {seq}-token sequences, longer than the {stream.numel()} calibration tokens"
    cut = stream[: rows * seq].reshape(rows, seq)
    if batch_e.is_number:
        usable = rows // batch * batch
        if usable == 0:
            return f"the graph takes a static batch of {batch} sequences of {seq} tokens; calibration holds {rows}"
        cut = cut[:usable]
    chunks = list(cut.split(batch))
    device = ids.device
    feeds = []
    for chunk in chunks:
        bind = {}
        if not batch_e.is_number:
            bind[batch_e] = chunk.shape[0]
        if not seq_e.is_number:
            bind[seq_e] = chunk.shape[1]
        args = []
        for i, (name, v) in enumerate(zip(names, values)):
            if i == pos:
                args.append(chunk.to(device=device, dtype=ids.dtype))
                continue
            arg = _derive_input(name, v, bind, chunk.shape)
            if isinstance(arg, str):
                return arg
            args.append(arg)
        feeds.append(args)
    return feeds, int(sum(c.numel() for c in chunks))


def _size(x: Any, bind: dict) -> int | None:
    e = _expr(x).xreplace(bind)
    return int(e) if e.is_number else None


def _derive_input(name: str, v: Any, bind: dict, chunk_shape: torch.Size) -> Any:
    """A value for a non-token-id input, derived from the chunk's sizes; a string says why there is none."""
    if isinstance(v, torch.SymInt):
        size = _size(v, bind)
        return size if size is not None else f"graph input {name} (a size) does not follow from batch and sequence"
    if not isinstance(v, torch.Tensor):
        return v
    shape = [_size(d, bind) for d in v.shape]
    if any(d is None for d in shape):
        return f"graph input {name} has a size that does not follow from batch and sequence"
    lname = name.lower()
    b, s = chunk_shape
    if "attention_mask" in lname and not v.is_floating_point():
        return torch.ones(shape, dtype=v.dtype, device=v.device)
    if ("cache_position" in lname or "position_ids" in lname) and not v.is_floating_point() and shape[-1] == s:
        return torch.arange(s, dtype=v.dtype, device=v.device).expand(shape).contiguous()
    if "past_key_values" in lname or (v.is_floating_point() and ("cache" in lname or not lname.startswith("l_"))):
        # A KV cache, its fill counters, or another buffer the graph writes: fresh zeros, never the user's tensors.
        return torch.zeros(shape, dtype=v.dtype, device=v.device)
    return f"graph input {name} ({str(v.dtype).removeprefix('torch.')} {tuple(shape)}) cannot be derived from " \
           "token ids"


def run_sequential(gm: torch.fx.GraphModule, feeds: list[list[Any]], targets: Sequence[torch.fx.Node],
                   quantize: Callable[..., Callable[..., torch.Tensor]],
                   progress: Callable[[int], None] | None = None, float_inputs: bool = False) -> None:
    """Run `gm` on every chunk in `feeds`, node by node; at each node of `targets` call `quantize`.

    `quantize(node, calls)` gets the node's evaluated (args, kwargs) for every chunk (args[0]: the activation;
    MoE grouped matmuls also need their expert offsets) and returns the quantized layer, called as
    layer(*args, **kwargs), whose outputs replace the node's for the rest of the run.

    With `float_inputs`, the unquantized graph runs beside it (only the values that differ are kept twice), and
    `quantize(node, calls, float_inputs)` also gets what the activation is in the float model, per chunk (None
    where it is the same everywhere): a layer can then be fitted to the float model's outputs rather than to its
    own on inputs that already carry the earlier layers' errors. Rows match the float model's only where the
    graph keeps token order (not for expert-sorted rows, whose routing may differ).
    """
    nodes = list(gm.graph.nodes)
    target_set = set(targets)
    if not target_set:
        return
    stop = max(i for i, n in enumerate(nodes) if n in target_set)
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
                    for env, shadow, (args, kwargs) in zip(envs, shadows, calls):
                        if float_inputs:
                            float_call(node, env, shadow, always=True)
                        env[node] = layer(*args, **kwargs)
                    del calls
                    done += 1
                    if progress is not None:
                        progress(done)
                else:
                    for env, shadow in zip(envs, shadows):
                        args = torch.fx.node.map_arg(node.args, env.__getitem__)
                        kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                        env[node] = node.target(*args, **kwargs)
                        if float_inputs:
                            float_call(node, env, shadow)
            for a in node.all_input_nodes:
                if last_use.get(a) == i:
                    for env, shadow in zip(envs, shadows):
                        env.pop(a, None)
                        shadow.pop(a, None)
