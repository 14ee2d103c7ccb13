"""Lowering: turn the rewritten aten graph into a callable, with Inductor (default) or as it is (`"eager"`).

Both return a boxed callable (takes a list of inputs) over the graph's remaining placeholders.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import torch
import torch.fx

from .._logging import logger
from ..config import CompileConfig
from torch.fx.experimental.proxy_tensor import make_fx

from ..passes.graph_utils import fake_mode_of

aten = torch.ops.aten

_warned_eager_cudagraphs = False


def decompose_for_inductor(gm: torch.fx.GraphModule, fake_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """Re-trace the rewritten graph through Inductor's decomposition table.

    Passes work on the graph as AOT autograd traced it (`aten.silu`, `aten.t`, our canonical `aten.linear`), which
    reads better and matches more simply; Inductor expects its own decompositions applied, as its own AOT step does.
    Constants come back as `_tensor_constant*` attributes holding the same tensors.
    """
    from torch._inductor.decomposition import select_decomp_table

    fake_mode = fake_mode_of(gm)
    with fake_mode or contextlib.nullcontext():
        return make_fx(gm, decomposition_table=select_decomp_table(), tracing_mode="real",
                       _allow_non_fake_inputs=True)(*fake_inputs)


def _mark_outputs_user_visible(gm: torch.fx.GraphModule) -> None:
    output = next(iter(reversed(gm.graph.nodes)))
    output.meta["user_visible_output_idxs"] = [
        i for i, n in enumerate(output.args[0]) if isinstance(n, torch.fx.Node)
    ]


def lower_inductor(gm: torch.fx.GraphModule, fake_inputs: Sequence[Any], config: CompileConfig,
                   static_input_idxs: Sequence[int], graph_id: int) -> Callable[[list], Any]:
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.fx_passes.joint_graph import joint_graph_passes
    from torch._inductor.utils import BoxedBool

    try:
        from torch._inductor.cudagraph_utils import BoxedDeviceIndex
    except ImportError:  # pragma: no cover - older layout
        from torch._inductor.utils import BoxedDeviceIndex  # type: ignore[no-redef]

    fake_mode = fake_mode_of(gm)
    # Constants are real tensors among fake ones, as in Inductor's own freezing path.
    allow_real = mock.patch.object(fake_mode, "allow_non_fake_inputs", True) if fake_mode else contextlib.nullcontext()
    patches = {"fx_graph_cache": False}  # its key would hash every frozen weight; and a stale hit would be wrong
    if config.max_autotune:
        patches["max_autotune"] = True
    with inductor_config.patch(patches), allow_real:
        gm = decompose_for_inductor(gm, fake_inputs)
        gm = joint_graph_passes(gm) or gm
        _mark_outputs_user_visible(gm)
        return compile_fx_inner(
            gm,
            list(fake_inputs),
            static_input_idxs=list(static_input_idxs),
            cudagraphs=BoxedBool(config.cudagraphs),
            graph_id=graph_id,
            is_inference=True,
            boxed_forward_device_index=BoxedDeviceIndex(None),
        )


def lower_eager(gm: torch.fx.GraphModule, config: CompileConfig) -> Callable[[list], Any]:
    global _warned_eager_cudagraphs
    if config.cudagraphs and not _warned_eager_cudagraphs:
        _warned_eager_cudagraphs = True
        warnings.warn(
            f"llmcompress: mode={config.mode!r} asks for CUDA graphs, which only lowering='inductor' provides; "
            "lowering='eager' runs without them",
            stacklevel=2,
        )
    logger.debug("eager lowering of graph with %d nodes", len(gm.graph.nodes))

    def run(args: list) -> Any:
        inputs = list(args)
        args.clear()
        return gm(*inputs)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def lower(gm: torch.fx.GraphModule, fake_inputs: Sequence[Any], config: CompileConfig,
          static_input_idxs: Sequence[int], graph_id: int) -> Callable[[list], Any]:
    if config.lowering == "inductor":
        return lower_inductor(gm, fake_inputs, config, static_input_idxs, graph_id)
    return lower_eager(gm, config)
