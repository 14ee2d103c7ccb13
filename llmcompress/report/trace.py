"""Capture a model's aten graphs for analysis, before and after passes: `trace_model`.

Runs the model once through the llmcompress backend with the eager lowering (on the meta device the run costs no
memory and no time) and keeps, per graph, the captured aten graph before the passes and after them. For a prefill,
batch and sequence are traced symbolically (at example sizes of at least 2, so Dynamo does not specialise them), so
costs are sympy expressions that `sizes` evaluates at the sizes asked for; a decode step over a static cache of
`kv_len` is traced at the batch given. On the meta device SDPA is traced as one attention node, as a GPU runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any

import sympy
import torch

from llmcompress.backend import make_backend
from llmcompress.cost.roofline import ATTENTION_OPS
from llmcompress.passes.base import PassContext
from llmcompress.report.module_paths import module_path


@dataclasses.dataclass
class TracedGraph:
    before: torch.fx.GraphModule
    """Aten graph as captured (weights frozen as get_attr constants), before passes."""
    after: torch.fx.GraphModule
    """The same graph after the passes."""
    sizes: dict[Any, int]
    """sympy Symbol -> value to evaluate costs at (the sizes asked for, else the traced example's)."""
    names: dict[str, str]
    """Symbol name -> readable name ("s0" -> "batch")."""
    weight_bytes: int
    """Bytes of the frozen weights the graph (after passes) reads."""
    weight_bytes_by_name: dict[str, int] = dataclasses.field(default_factory=dict)
    """Weight name (`model.layers.0.mlp.up_proj.weight`, or a pass's derived name) -> bytes, graph after passes."""
    weight_bytes_by_name_before: dict[str, int] = dataclasses.field(default_factory=dict)
    """The same for the graph as captured."""
    modules: frozenset[str] | None = None
    """The model's module paths (`named_modules`): what Dynamo's module names are read as (`module_paths`)."""


@torch.library.custom_op("llmcompress::analysis_attention", mutates_args=())
def _analysis_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                        is_causal: bool, scale: float | None) -> torch.Tensor:
    """Stand-in for SDPA while tracing on the meta device, where SDPA would trace to its unfused math form."""
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@_analysis_attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


ATTENTION_OPS.add(torch.ops.llmcompress.analysis_attention.default)  # priced like SDPA (is_causal is args[4])


def _meta_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return torch.ops.llmcompress.analysis_attention(query, key, value, attn_mask, is_causal, scale)


@contextlib.contextmanager
def _fused_attention_on_meta(device: torch.device):
    """On the meta device, trace SDPA as one attention node (what a GPU runs), not as bmm + softmax."""
    if device.type != "meta":
        yield
        return
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _meta_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _sym_of(x: Any) -> sympy.Symbol | None:
    if isinstance(x, torch.SymInt) and isinstance(x.node.expr, sympy.Symbol):
        return x.node.expr
    return None


def trace_model(model: torch.nn.Module, input_ids: torch.Tensor, *, passes: list[str] | None = None,
                recipe: str | None = None, kv_len: int | None = None) -> list[TracedGraph]:
    """Trace `model(input_ids)` (a prefill, or with `kv_len` one decode step over a static cache of that length).

    `input_ids`: (B, S) token ids on the model's device; B and S are the sizes costs are evaluated at.
    Resets Dynamo's caches (`torch._dynamo.reset()`), like any fresh compile would need.
    """
    batch, seq = input_ids.shape
    if batch < 1 or seq < 1:
        raise ValueError(f"input_ids must be (batch >= 1, seq >= 1), got {tuple(input_ids.shape)}")
    want = {"batch": batch, "seq": seq}
    if kv_len is None:
        # Trace at sizes >= 2 so that Dynamo keeps them symbolic (it specialises 0 and 1).
        example = torch.randint(0, 2, (max(batch, 2), max(seq, 2)), device=input_ids.device)
        torch._dynamo.mark_dynamic(example, 0)
        torch._dynamo.mark_dynamic(example, 1)
    else:
        # A decode step over a static cache: the cache fixes the batch, so it is traced as given.
        example = torch.randint(0, 2, (batch, 1), device=input_ids.device)
    options: dict[str, Any] = {"lowering": "eager"}
    if passes is not None:
        options["passes"] = list(passes)
    elif recipe is not None:
        options["recipe"] = recipe
    else:
        options["passes"] = []
    kwargs: dict[str, Any] = {"use_cache": False}
    if kv_len is not None:
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=kv_len)
        # transformers renames `past_key_values` to `cache` model by model (the old name warns, then goes).
        cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        kwargs = {"use_cache": True, cache_key: cache,
                  "cache_position": torch.tensor([kv_len - 1], device=input_ids.device)}

    traced: list[TracedGraph] = []
    modules = frozenset(name for name, _ in model.named_modules())
    tensors = frozenset(name for name, _ in model.named_parameters(remove_duplicate=False)) | \
        frozenset(name for name, _ in model.named_buffers(remove_duplicate=False))

    def observe(before: torch.fx.GraphModule, after: torch.fx.GraphModule, ctx: PassContext) -> None:
        sizes = dict(_example_sizes(ctx))
        names: dict[str, str] = {}
        ids = next((x for x in ctx.example_inputs if isinstance(x, torch.Tensor) and x.dtype == torch.int64
                    and x.dim() == 2), None)
        if ids is not None:
            for dim, name in ((0, "batch"), (1, "seq")):
                s = _sym_of(ids.shape[dim])
                if s is not None:
                    names[str(s)] = name
                    sizes[s] = want[name]
        by_name = _weight_bytes(ctx, after, tensors)
        traced.append(TracedGraph(before, after, sizes, names, sum(by_name.values()), by_name,
                                  _weight_bytes(ctx, before, tensors), modules))

    torch._dynamo.reset()
    try:
        with _fused_attention_on_meta(input_ids.device), torch.no_grad():
            if kv_len is not None:
                model(example, **kwargs)  # the static cache allocates its tensors on first use: not in the graph
                kwargs["cache_position"] = kwargs["cache_position"].clone()
            compiled = torch.compile(model, backend=make_backend(on_graph=observe), options=options)
            compiled(example, **kwargs)
    finally:
        torch._dynamo.reset()
    return traced


def _weight_bytes(ctx: PassContext, gm: torch.fx.GraphModule, tensors: frozenset[str]) -> dict[str, int]:
    """Bytes per weight name: the model's parameter or buffer name, or the name a pass gave a weight it derived."""
    used = ctx.weights.used_attrs(gm)
    out: dict[str, int] = {}
    for attr, w in ctx.weights.by_attr.items():
        if attr in used:
            name = module_path(w.fqn, tensors) or w.fqn
            out[name] = out.get(name, 0) + w.tensor.numel() * w.tensor.element_size()
    return out


def _example_sizes(ctx: PassContext) -> dict[Any, int]:
    from llmcompress.cost.roofline import example_sizes

    return example_sizes(ctx.fake_mode)
