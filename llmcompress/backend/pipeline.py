"""The path of one graph, from Dynamo to a compiled callable: `compile_graph` lists the stages in order."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import operator
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from llmcompress._logging import logger
from llmcompress.backend import verify as _verify
from llmcompress.backend.capture import capture_dynamo_graph, freeze_aten_graph, is_weight_input, needs_grad
from llmcompress.backend.compile_report import dynamo_graph_info, report_for
from llmcompress.backend.lowering import TRITON_LOWERING_PASSES, check_lowering_device, lower
from llmcompress.calibration.service import Calibration
from llmcompress.config import CompileConfig
from llmcompress.cost.device_profile import load_profile
from llmcompress.cost.hardware import resolve as resolve_hardware
from llmcompress.cost.roofline import CostModel, example_sizes
from llmcompress.errors import LLMCompressError
from llmcompress.passes.base import PassContext
from llmcompress.passes.manager import PassManager
from llmcompress.passes.weight_store import open_store
from llmcompress.passes.weights import DERIVED
from llmcompress.recipes import PassSpec, load_recipe, parse_pass_specs

_graph_ids = itertools.count()

GraphHook = Callable[[torch.fx.GraphModule, torch.fx.GraphModule, PassContext], None]
"""`on_graph(before, after, ctx)`: the captured aten graph before the passes, after them, and their context.
Given to `backend.make_backend(on_graph=...)` by whoever needs the graphs (cost reports, tests)."""


class FallbackWarning(UserWarning):
    """A graph runs uncompressed (no passes), with the reason in the message and the compile report."""


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any], config: CompileConfig,
                  on_graph: GraphHook | None = None) -> Callable[..., Any]:
    """Dynamo graph + real example inputs -> compiled callable taking the same inputs.

    The weights are frozen into the compiled graph, but Dynamo may call one graph with other modules' weights: with
    `inline_inbuilt_nn_modules` (torch's default) parameters are graph inputs, not guarded by identity, so a graph
    traced inside one layer (after a graph break, e.g. transformers' eager experts loop) serves every layer. Each
    call therefore checks that its weight inputs are the tensors compiled in (`is`, a C-level loop) and compiles the
    graph again for a set of weights it has not seen (once per set), never running it with stale constants.

    That compile runs at call time, outside Dynamo's tracing context, so it re-enters a context on Dynamo's fake
    mode: the first call's inputs keep their symbolic sizes there (a `dynamic=True` graph compiled without it came
    out static at the first call's sizes and failed on the next size), and scalars Dynamo left unspecialised (an
    RMSNorm epsilon read with `.item()`) stay symbolic instead of failing as data-dependent."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    at = [i for i, (n, x) in enumerate(zip(placeholders, example_inputs)) if is_weight_input(n, x)]
    first = _compile_graph_once(gm, example_inputs, config, on_graph)
    if not at:
        return first
    tracing = torch._guards.TracingContext.try_get()
    compiled_in = [example_inputs[i] for i in at]
    variants: dict[tuple[int, ...], tuple[Callable[..., Any], list[Any]]] = {}

    def dispatch(*args: Any) -> Any:
        if all(map(operator.is_, [args[i] for i in at], compiled_in)):
            return first(*args)
        weights = [args[i] for i in at]
        key = tuple(map(id, weights))
        hit = variants.get(key)
        if hit is None or not all(map(operator.is_, weights, hit[1])):
            logger.info("graph reused with other weights (%d inputs differ): compiling it for them",
                        sum(a is not b for a, b in zip(weights, compiled_in)))
            inputs = list(example_inputs)
            for i, w in zip(at, weights):
                inputs[i] = w
            try:
                with _like_dynamo_tracing(tracing):
                    inputs = _unspecialised_scalars_as_fakes(placeholders, inputs, tracing)
                    compiled = _compile_graph_once(gm, inputs, dataclasses.replace(config, verify=False), on_graph)
                if config.verify is not False:  # on this call's real inputs (the scalars above are fake)
                    _verify.compare(gm, compiled, list(args), config)
            except LLMCompressError:
                raise  # as in the first compile: a bad option or a verification beyond tolerance is the user's to see
            except Exception as e:  # noqa: BLE001 - even Inductor's fallback failed: run Dynamo's graph as is
                if config.strict:
                    raise
                warnings.warn(f"llmcompress: a graph reused with other weights could not be compiled for them "
                              f"({type(e).__name__}: {str(e)[:200]}); it runs uncompressed for them",
                              FallbackWarning, stacklevel=2)
                compiled = gm.forward
            hit = variants[key] = (compiled, weights)
        return hit[0](*args)

    return dispatch


def _unspecialised_scalars_as_fakes(placeholders: list[torch.fx.Node], inputs: list[Any], tracing: Any) -> list[Any]:
    """Scalars Dynamo left unspecialised (a float module attribute such as an RMSNorm epsilon, passed as a 0-d
    tensor the graph reads with `.item()`) as fakes of the backend's fake mode carrying Dynamo's symbolic value: by
    the time a variant compiles, fakifying the real tensor again gives a fake without it, and `.item()` failed as
    data-dependent."""
    if tracing is None or tracing.fake_mode is None:
        return inputs
    out = list(inputs)
    for i, (node, x) in enumerate(zip(placeholders, inputs)):
        memo = getattr(node.meta.get("example_value"), "item_memo", None)
        if isinstance(x, torch.Tensor) and x.dim() == 0 and memo is not None:
            fake = tracing.fake_mode.from_tensor(x, static_shapes=True)
            fake.item_memo = memo
            out[i] = fake
    return out


def _like_dynamo_tracing(tracing: Any) -> Any:
    """A fresh tracing context on the first compile's fake mode and its record of how each input was fakified
    (symbolic sizes, unspecialised scalars), or nothing when the first compile had none."""
    if tracing is None:
        return contextlib.nullcontext()
    fresh = torch._guards.TracingContext(tracing.fake_mode)
    fresh.tensor_to_context = tracing.tensor_to_context
    return torch._guards.tracing(fresh)


def _compile_graph_once(gm: torch.fx.GraphModule, example_inputs: list[Any], config: CompileConfig,
                        on_graph: GraphHook | None = None) -> Callable[..., Any]:
    """`compile_graph` for the weights in `example_inputs`."""
    # Every option is checked before anything may fall back (gradients required, a bug of ours): an unknown pass,
    # a bad pass option or a lowering that cannot run here raises, whatever the grad mode.
    manager = pass_manager(config)
    check_lowering_device(config, example_inputs)
    start = time.perf_counter()
    entry: dict[str, Any] = {**dynamo_graph_info(gm), "graph_id": next(_graph_ids), "lowering": config.lowering,
                             "mode": config.mode, "nodes_in": sum(1 for _ in gm.graph.nodes)}
    # Dynamo reads its graph again after the backend returns (to call the result): never edit it in place.
    original, gm = gm, copy_dynamo_graph(gm)
    try:
        # 0. Inference only: with gradients required, run the graph uncompressed (README, "Training").
        if needs_grad(example_inputs):
            compiled = _fallback(original, example_inputs, config, entry,
                                 "gradients are required (grad mode on and an input requires grad); "
                                 "llmcompress compiles for inference: use torch.no_grad()/inference_mode() or "
                                 "model.requires_grad_(False)")
        else:
            compiled, state = _compile(gm, example_inputs, config, entry, manager, on_graph)
            # 5. Verify against the uncompiled graph on the example inputs (raises beyond tolerance).
            if config.verify is not False:
                entry["verify"] = _verify.compare(original, compiled, example_inputs, config)
            # 6. Release dense originals that no compiled graph reads any more.
            if config.release_weights and state.get("weights") is not None:
                freed = state["weights"].release_unused(state["final_gm"])
                entry["released_weights"] = {"count": len(freed), "bytes": sum(freed.values())}
    except (LLMCompressError, torch._dynamo.exc.TorchDynamoException):
        raise  # ours are deliberate; Dynamo's steer its own tracing (RestartAnalysis asks it to trace again)
    except Exception as e:  # noqa: BLE001 - our own bug must not break the user's model
        if config.strict:
            raise
        compiled = _fallback(original, example_inputs, config, entry, f"{type(e).__name__}: {e}")
        logger.debug("fallback", exc_info=True)
    entry["compile_time_s"] = round(time.perf_counter() - start, 4)
    report = report_for(config.report)
    if report is not None:
        report.add_graph(entry)
    return compiled


def _compile(gm, example_inputs, config: CompileConfig, entry: dict, manager: PassManager,
             on_graph: GraphHook | None) -> tuple[Callable[..., Any], dict]:
    from torch._dynamo.backends.common import aot_autograd

    # 1. Capture: module parameters and buffers become buffers of the graph (constants after AOT).
    capture = capture_dynamo_graph(gm, example_inputs)
    entry["frozen_weights"] = {"count": len(capture.frozen),
                               "bytes": sum(w.tensor.numel() * w.tensor.element_size() for w in capture.frozen)}
    state: dict[str, Any] = {}

    def compile_aten(aten_gm: torch.fx.GraphModule, aten_inputs: list[Any]) -> Callable[[list], Any]:
        tracing = torch._guards.TracingContext.try_get()
        fw_metadata = tracing.fw_metadata if tracing is not None else None
        # 2. Freeze: AOT's lifted weight inputs become get_attr constants.
        weights, kept = freeze_aten_graph(aten_gm, capture, fw_metadata)
        fake_inputs = [aten_inputs[i] for i in kept]
        weights.store = open_store(config.disk_cache)
        derived_before = DERIVED.counters()
        hardware = resolve_hardware(config.hardware, _device_of(fake_inputs))
        cost_model = CostModel(hardware, load_profile(hardware))
        fake_mode = _fake_mode(aten_inputs)
        sizes = example_sizes(fake_mode)
        # Pricing a whole graph costs ~0.3 s per 32-layer decode graph (2,379 nodes, this CPU): only for a report.
        if config.report is not None:
            entry["predicted_before"] = _predict(cost_model, aten_gm, sizes)
        before = _copy_graph_module(aten_gm) if on_graph is not None else None
        # 3. Passes, in constraint order; a failing pass is undone (or raises under strict).
        names = [w.fqn for w in capture.frozen] + [n.name for n in capture.gm.graph.find_nodes(op="placeholder")]
        input_names = [names[i] if i < len(names) else f"input {i}" for i in kept]
        # Loaded (tokenized) only when a pass asks for it; shared by the graph's passes.
        calibration = Calibration(config.calibration, config.tokenizer, config.calibration_samples,
                                  config.calibration_seq_len, example_inputs=fake_inputs, input_names=input_names,
                                  scalars=_real_scalars(example_inputs, capture, kept))
        ctx = PassContext(fake_inputs, weights, hardware, config, fake_mode, graph_id=str(entry["graph_id"]),
                          cost_model=cost_model, sizes=sizes, input_names=input_names, calibration=calibration)
        records = manager.run(aten_gm, ctx)
        if config.report is not None:
            entry["predicted_after"] = _predict(cost_model, aten_gm, sizes)
        if on_graph is not None:
            on_graph(before, aten_gm, ctx)
        entry["passes"] = [r.to_json() for r in records]
        entry["derived_weights"] = {k: v - derived_before[k] for k, v in DERIVED.counters().items()}
        entry["nodes_out"] = sum(1 for _ in aten_gm.graph.nodes)
        weights.check_not_released(aten_gm)
        # 4. Lower: Inductor, or the FX graph as it is.
        static = [kept.index(i) for i in getattr(fw_metadata, "static_input_indices", []) or [] if i in kept]
        t0 = time.perf_counter()
        fn = lower(aten_gm, fake_inputs, config, static, entry["graph_id"])
        entry["lowering_time_s"] = round(time.perf_counter() - t0, 4)
        weights.mark_in_use(aten_gm)
        state.update(weights=weights, final_gm=aten_gm)

        def run(args: list) -> Any:
            kept_args = [args[i] for i in kept]
            args.clear()
            return fn(kept_args)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    aot_fn = aot_autograd(fw_compiler=compile_aten, inference_compiler=compile_aten,
                          keep_inference_input_mutations=True)(capture.gm, [example_inputs[i] for i in capture.runtime_positions])
    positions = capture.runtime_positions

    def compiled(*args: Any) -> Any:
        return aot_fn(*[args[i] for i in positions])

    return compiled, state


def pass_manager(config: CompileConfig) -> PassManager:
    """The passes the config asks for (options["passes"], else the recipe's; plus the lowering's own), built: an
    unknown pass name or a bad pass option raises `OptionError` here."""
    if config.passes is not None:
        specs = parse_pass_specs(config.passes, "options")
    else:
        specs = load_recipe(config.recipe).passes
    if config.lowering == "triton":
        specs = with_lowering_passes(specs, TRITON_LOWERING_PASSES)
    return PassManager.from_specs(specs, strict=config.strict)


def with_lowering_passes(specs: tuple[PassSpec, ...], required: dict[str, dict[str, Any]]) -> tuple[PassSpec, ...]:
    """The recipe's passes plus the lowering's own: a pass already there gets the lowering's options on top of its
    own, a missing one is appended (the manager orders them by their after/before constraints)."""
    out = [PassSpec(s.name, {**s.options, **required[s.name]}) if s.name in required else s for s in specs]
    present = {s.name for s in specs}
    out += [PassSpec(name, dict(opts)) for name, opts in required.items() if name not in present]
    return tuple(out)


def _predict(cost_model: CostModel, gm: torch.fx.GraphModule, sizes: dict) -> dict[str, Any]:
    """Predicted totals at the example's sizes, for the report; never fails a compile."""
    try:
        cost = cost_model.estimate(gm)
        return {"hardware": cost_model.hardware.name, "sizes": {str(k): v for k, v in sizes.items()},
                **cost.summary(sizes)}
    except Exception as e:  # noqa: BLE001 - a cost-model gap must not break compilation
        logger.debug("cost prediction failed", exc_info=True)
        return {"error": f"{type(e).__name__}: {e}"}


def _fallback(original: torch.fx.GraphModule, example_inputs, config: CompileConfig, entry: dict, reason: str):
    warnings.warn(f"llmcompress: graph {entry['graph_id']} runs uncompressed: {reason}", FallbackWarning, stacklevel=3)
    entry["fallback"] = reason
    if config.lowering == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(original, example_inputs)
    # Eager, and for triton too: its kernels come from passes that did not run. The report says what ran.
    entry["lowering"] = "eager"
    return original.forward


def _real_scalars(example_inputs: list[Any], capture, kept: list[int]) -> dict[int, torch.Tensor]:
    """{position among the kept aten inputs: real value} of the 0-d floating inputs Dynamo passed (a model's float
    attribute lifted under dynamic shapes): calibration feeds them as they were. AOT's inputs are the lifted weights,
    then Dynamo's runtime inputs in order."""
    n_frozen = len(capture.frozen)
    out = {}
    for j, i in enumerate(kept):
        if i < n_frozen or i - n_frozen >= len(capture.runtime_positions):
            continue
        v = example_inputs[capture.runtime_positions[i - n_frozen]]
        if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point() \
                and not isinstance(v, torch._subclasses.fake_tensor.FakeTensor):
            with torch._subclasses.fake_tensor.unset_fake_temporarily():  # compile_aten runs under fake mode
                out[j] = v.detach().clone()
    return out


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A structural copy sharing the constants (node meta copied shallowly)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    return torch.fx.GraphModule(gm, graph)


def copy_dynamo_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy sharing attributes, with the Dynamo metadata AOT autograd reads (node sources, param sources)."""
    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, val_map))
    graph._codegen = gm.graph._codegen
    new = torch.fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    for old, copied in val_map.items():
        if hasattr(old, "_dynamo_source"):
            copied._dynamo_source = old._dynamo_source
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = dict(gm._param_name_to_source)
    return new


def _device_of(inputs: list[Any]) -> torch.device | None:
    return next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)


def _fake_mode(inputs: list[Any]):
    from torch._guards import detect_fake_mode

    return detect_fake_mode(inputs)
