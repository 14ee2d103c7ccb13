"""Report deep models from a three-layer trace: the decoder layers of most LLMs are identical, so their costs are too.

Tracing goes through Dynamo and AOT autograd at about a second per decoder layer on a CPU (a 70B config's 80 layers
took 80 s); the cost of the report is all in the trace. `report_model` therefore traces a copy of the config with
three layers, checks that the last two priced layers are identical (same ops, shapes, FLOPs, bytes and times,
relative to their layer), and repeats the last one's rows up to the real depth. The first layer is not compared: a
fusion may put model-level work into it (the rotary tables, computed once, fused into the first layer's rotary
kernel), as it does at full depth. Configs whose layers differ by design
(alternating attention kinds, dense layers before MoE ones, ...) are traced in full: `repeatable_depth` says which.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

TRACED_LAYERS = 3

# Config keys that make decoder layers differ from each other when set to a non-trivial value.
_HETEROGENEOUS_KEYS = {
    "first_k_dense_replace": lambda v: bool(v),    # DeepSeek: dense MLP in the first k layers
    "mlp_only_layers": lambda v: bool(v),          # Qwen-MoE: dense MLP in the listed layers
    "decoder_sparse_step": lambda v: v not in (None, 1),
    "moe_layer_freq": lambda v: v not in (None, 1),
    "interleave_moe_layer_step": lambda v: v not in (None, 1),
    "no_rope_layers": lambda v: bool(v) and len(set(v)) > 1,
    "sliding_window_pattern": lambda v: v not in (None, 1),
    "full_attn_idxs": lambda v: bool(v),
    "attn_layer_indices": lambda v: bool(v),
    "block_types": lambda v: bool(v) and len(set(map(str, v))) > 1,
}


def repeatable_depth(config: Any) -> int | None:
    """The config's decoder depth when its layers are alike and deeper than `TRACED_LAYERS`, else None."""
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int) or depth <= TRACED_LAYERS:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(set(map(str, layer_types))) > 1:
        return None
    for key, differs in _HETEROGENEOUS_KEYS.items():
        if differs(getattr(config, key, None)):
            return None
    return depth


def shallow_config(config: Any, depth: int = TRACED_LAYERS) -> Any:
    """A copy of `config` with `depth` decoder layers (per-layer lists cut to match)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = depth
    if getattr(small, "layer_types", None) is not None:
        small.layer_types = list(small.layer_types)[:depth]
    return small


_INDEXED_LAYER = re.compile(r"^(.*?)(\d+)$")


def layer_index(layer: str) -> tuple[str, int] | None:
    """("model.layers.", 3) for "model.layers.3"; None for a name without a trailing index."""
    m = _INDEXED_LAYER.match(layer)
    return (m.group(1), int(m.group(2))) if m else None


def signature(rows: Sequence[dict[str, Any]], layer: str) -> tuple:
    """What must match for two layers to be interchangeable in a report: every priced row, relative to the layer."""
    return tuple((_relative(r["module"], layer), r["op"], r["kind"], r["shape_symbolic"], r["dtype"], r["flops"],
                  r["bytes"], r["time_s"]) for r in rows if r["layer"] == layer)


def _relative(module: str, layer: str) -> str:
    return module[len(layer) + 1:] if module.startswith(layer + ".") else "" if module == layer else module


def _renamed(name: str, template: str, layer: str) -> str:
    return layer + name[len(template):] if name == template or name.startswith(template + ".") else name


def repeat_layers(rows: list[dict[str, Any]], exprs: list[Any], template: str, depth: int
                  ) -> tuple[list[dict[str, Any]], list[Any]] | None:
    """Rows (and their parallel symbolic costs) with `template`'s rows repeated for the layers up to `depth`.

    `template` is the last traced layer ("model.layers.2"); copies are named "model.layers.3" ... and carry
    `replicated_from: template`. Returns None when the traced layers are not alike (the caller traces in full).
    """
    parsed = layer_index(template)
    if parsed is None:
        return None
    prefix, last = parsed
    previous = f"{prefix}{last - 1}"
    if last != TRACED_LAYERS - 1 or signature(rows, previous) != signature(rows, template) \
            or not signature(rows, template):
        return None
    # Each contiguous run of the template's rows is followed by its copies, layer by layer: a decode graph has the
    # layers' bodies in order and then, at its end, their cache write-backs in the same order.
    out_rows: list[dict[str, Any]] = []
    out_exprs: list[Any] = []
    run: list[int] = []
    for i, r in enumerate(rows + [{"layer": None}]):
        if r["layer"] == template:
            run.append(i)
            out_rows.append(r)
            out_exprs.append(exprs[i])
            continue
        if run:
            for index in range(last + 1, depth):
                layer = f"{prefix}{index}"
                for j in run:
                    copy_ = dict(rows[j], layer=layer, module=_renamed(rows[j]["module"], template, layer),
                                 replicated_from=template)
                    out_rows.append(copy_)
                    out_exprs.append(exprs[j])
            run = []
        if i < len(rows):
            out_rows.append(r)
            out_exprs.append(exprs[i])
    return out_rows, out_exprs


def repeat_weight_bytes(by_name: dict[str, int], template: str, depth: int) -> int:
    """Total weight bytes with the template layer's weights counted once more for each layer not traced."""
    parsed = layer_index(template)
    assert parsed is not None
    per_layer = sum(b for name, b in by_name.items() if name == template or name.startswith(template + "."))
    return sum(by_name.values()) + (depth - parsed[1] - 1) * per_layer
