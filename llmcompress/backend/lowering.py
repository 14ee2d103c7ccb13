"""Lowering: turn the rewritten aten graph into a callable, with Inductor (default), as it is (`"eager"`), or with
our own kernels (`"triton"`).

`"triton"` runs the graph as it is too: by then the pipeline has run the lowering's own passes
(`TRITON_LOWERING_PASSES`: every dense linear on our Triton linear kernel, every group of pointwise ops and
reductions on a kernel our code generator wrote), so what is left in aten is what we do not generate (attention
through SDPA, embedding, indexing, views). It needs a CUDA device, or the CPU under the Triton interpreter; elsewhere
our ops would only run their PyTorch references, so `check_lowering_device` refuses it. With
`mode="reduce-overhead"` it is replayed through CUDA graphs (torch's CUDA-graph trees, as Dynamo's `cudagraphs`
backend uses them).

Each returns a boxed callable (takes a list of inputs) over the graph's remaining placeholders.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from llmcompress._logging import logger
from llmcompress.backend.branches import lower_branches, split_of
from llmcompress.config import CompileConfig
from llmcompress.errors import OptionError
from llmcompress.fx_utils import fake_mode_of

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
            f"llmcompress: mode={config.mode!r} asks for CUDA graphs, which only lowering='inductor' and 'triton' provide; "
            "lowering='eager' runs without them",
            stacklevel=2,
        )
    logger.debug("eager lowering of graph with %d nodes", len(gm.graph.nodes))
    return _boxed_graph(gm)


TRITON_LOWERING_PASSES: dict[str, dict[str, Any]] = {
    "fuse-linear-epilogue": {"force": True},
    "fuse-pointwise": {"force": True},
}
"""Passes `lowering="triton"` runs after the recipe's (with these options; a recipe's own options are kept)."""


def _boxed_graph(gm: torch.fx.GraphModule) -> Callable[[list], Any]:
    def run(args: list) -> Any:
        inputs = list(args)
        args.clear()
        return gm(*inputs)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _cudagraph_skip_reason(gm: torch.fx.GraphModule, static_input_idxs: Sequence[int]) -> str | None:
    from torch._dynamo.backends.cudagraphs import find_input_mutations, get_device_node_mapping

    devices = set(get_device_node_mapping(gm))
    if any(d.type != "cuda" for d in devices) or len(devices) != 1:
        return f"the graph's tensors are on {sorted(map(str, devices))}, not one CUDA device"
    mutated = set(find_input_mutations(gm.graph)) - set(static_input_idxs)
    if mutated:
        return f"it writes to inputs {sorted(mutated)} that are not static (CUDA graphs would replay stale pointers)"
    return None


def lower_triton(gm: torch.fx.GraphModule, fake_inputs: Sequence[Any], config: CompileConfig,
                 static_input_idxs: Sequence[int]) -> Callable[[list], Any]:
    run = _boxed_graph(gm)
    if not config.cudagraphs:
        return run
    reason = _cudagraph_skip_reason(gm, static_input_idxs)
    if reason is not None:
        warnings.warn(f"llmcompress: lowering='triton' runs this graph without CUDA graphs: {reason}", stacklevel=2)
        return run
    from torch._dynamo.backends.cudagraphs import find_input_mutations, get_device_index
    from torch._inductor.cudagraph_trees import cudagraphify_impl
    from torch._inductor.cudagraph_utils import get_placeholder_info

    out = cudagraphify_impl(run, list(fake_inputs), list(static_input_idxs), device_index=get_device_index(gm),
                            is_backward=False, is_inference=True, stack_traces=[],
                            placeholders=get_placeholder_info(gm.graph),
                            mutated_input_idxs=find_input_mutations(gm.graph))
    out._boxed_call = True  # type: ignore[attr-defined]
    return out


def check_lowering_device(config: CompileConfig, example_inputs: Sequence[Any]) -> None:
    """`OptionError` when `lowering="triton"` cannot run our Triton kernels where the graph's tensors are.

    On a CPU without the interpreter our ops would run their PyTorch references while the report said the Triton
    lowering ran. A graph with a tensor on a CUDA device runs there (a CPU index among them does not count); the
    meta device (cost reports) runs nothing, so it passes.
    """
    from llmcompress.kernels import linear_common  # read at call time: tests switch the interpreter off

    devices = {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)}
    if config.lowering != "triton" or not devices or devices & {"cuda", "meta"}:
        return
    if devices == {"cpu"} and linear_common.INTERPRETED:
        return
    raise OptionError(
        f"options: key 'lowering' got 'triton', but our Triton kernels cannot run on {', '.join(sorted(devices))} "
        "here: they need a CUDA device, or on the CPU the Triton interpreter (TRITON_INTERPRET=1 in the environment "
        "before triton is imported; slow, for tests); use lowering='inductor' or 'eager' on this device"
    )


def lower(gm: torch.fx.GraphModule, fake_inputs: Sequence[Any], config: CompileConfig,
          static_input_idxs: Sequence[int], graph_id: int) -> Callable[[list], Any]:
    """The graph lowered as `config.lowering` says; a graph the early-exit pass cut into pieces lowers each piece so
    and chooses between them at run time (`branches.py`)."""
    branches = split_of(gm)
    if branches is not None:
        return lower_branches(branches, lambda piece, fakes: _lower_graph(piece, fakes, config, [], graph_id))
    return _lower_graph(gm, fake_inputs, config, static_input_idxs, graph_id)


def _lower_graph(gm: torch.fx.GraphModule, fake_inputs: Sequence[Any], config: CompileConfig,
                 static_input_idxs: Sequence[int], graph_id: int) -> Callable[[list], Any]:
    if config.lowering == "inductor":
        return lower_inductor(gm, fake_inputs, config, static_input_idxs, graph_id)
    if config.lowering == "triton":
        return lower_triton(gm, fake_inputs, config, static_input_idxs)
    return lower_eager(gm, config)
