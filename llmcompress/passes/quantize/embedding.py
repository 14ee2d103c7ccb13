"""The token-embedding table in int8 rows or int4 groups, for `quantize-linear`'s `embedding` option.

Weight-only schemes leave the embedding as the largest dense tensor a decoder keeps (a 483 M-parameter Llama: 65.5 M
of its 352 M + 131 M non-linear parameters; the w8a16 / w4a16 resident-memory targets of 0.6x / 0.4x the bf16 model
need it compressed). `aten.embedding(table, ids)` on a frozen table becomes `llmcompress::embedding_w8` /
`embedding_w4` (kernels/quantized_embedding.py) on the table quantized once (`ctx.weights.derive`), so with
`release_weights` the dense table is freed. A table another node also reads (tied to a dense LM head) is left
alone: compressing it would add a copy, not remove one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llmcompress.formats import quantized as formats
from llmcompress.fx_utils import call
from llmcompress.passes.base import Pass, PassContext

aten = torch.ops.aten

EMBEDDING_FORMATS = ("dense", "int8", "int4")


def quantize_embeddings(gm: torch.fx.GraphModule, ctx: PassContext, owner: Pass, fmt: str, group_size: int,
                        stats: dict[str, int], decisions: list[dict[str, Any]]) -> bool:
    """Rewrite every embedding lookup on a frozen table into the `fmt` ("int8" or "int4") op; True if any was.

    The derived tables are keyed by `owner.cache_key("embedding", fmt, group_size)`.
    """
    changed = False
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is aten.embedding.default):
            continue
        table, ids = node.args[0], node.args[1]
        if not ctx.weights.is_constant(table):
            continue
        name = ctx.weights.name(table) or table.name
        reason = _skip_reason(gm, ctx, node, table, fmt, group_size)
        if reason is not None:
            label = f"embedding skipped: {reason.split(':')[0]}"
            stats[label] = stats.get(label, 0) + 1
            decisions.append({"node": node.name, "layer": name.removesuffix(".weight"), "skipped": reason})
            continue
        dtype = table.meta["val"].dtype
        key = owner.cache_key("embedding", fmt, group_size)
        if fmt == "int8":
            tensors = ctx.weights.derive(table, key, formats.quantize_int8_per_channel)
            suffixes, op = ("qweight", "scale"), torch.ops.llmcompress.embedding_w8.default
        else:
            tensors = ctx.weights.derive(table, key, lambda w: formats.quantize_int4_rtn(w, group_size))
            suffixes, op = ("qweight", "scales", "zeros"), torch.ops.llmcompress.embedding_w4.default
        module = name.removesuffix(".weight")
        with gm.graph.inserting_before(node):
            consts = [ctx.weights.add(gm, t, f"{module}.{s}") for t, s in zip(tensors, suffixes)]
            args = (ids, *consts, dtype) if fmt == "int8" else (ids, *consts, group_size, dtype)
            new = call(gm.graph, ctx.fake_mode, op, args)
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        stats[f"embedding {fmt}"] = stats.get(f"embedding {fmt}", 0) + 1
        with unset_fake_temporarily():
            shape = list(table.meta["val"].shape)
            dense_bytes = int(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size())
        decisions.append({"node": node.name, "layer": module, "embedding": fmt, "shape": shape,
                          "quantized_bytes": int(sum(t.numel() * t.element_size() for t in tensors)),
                          "dense_bytes": dense_bytes})
        changed = True
    return changed


def _skip_reason(gm: torch.fx.GraphModule, ctx: PassContext, node: torch.fx.Node, table: torch.fx.Node, fmt: str,
                 group_size: int) -> str | None:
    dtype = table.meta["val"].dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype: table is {dtype}; quantized embeddings take float16/bfloat16/float32 tables"
    name = ctx.weights.name(table)
    for other in gm.graph.nodes:
        if other is node or other.op != "call_function":
            continue
        if any(isinstance(a, torch.fx.Node) and ctx.weights.is_constant(a) and ctx.weights.name(a) == name
               for a in other.all_input_nodes):
            return f"tied: the table is also read dense by {other.name} (a tied LM head); compressing it adds a copy"
    d = table.meta["val"].shape[-1]
    if fmt == "int4" and d % group_size:
        return f"group size: group_size {group_size} does not divide the embedding width {d}"
    return None


__all__ = ["EMBEDDING_FORMATS", "quantize_embeddings"]
