"""The module path a user knows ("model.layers.2") from whatever name Dynamo gives a module or a weight.

Dynamo names a module by how the compiled frame reached it, and that changes with the model's code, not with the
model: "L['self'].model.layers.2" when the model's forward is the frame, "L['args'][0].model.layers.2" when a
decorator wraps it (transformers 5.25's deprecation wrapper), "G['model']..." for a global, "getattr(L['self'].layers,
'2')", "L['self']._modules['layers']._modules['2']" ... Reports group rows and weights by layer name, so every such
name goes through `module_path`, which finds the path in the model's own module structure.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

# getattr(X, 'k') with no call or comma inside X: the innermost one, so nested getattrs unwind from the inside.
_GETATTR = re.compile(r"getattr\(([^(),]*), '([^']*)'\)")
# One step of a source name: `.attr`, `['key']`, `[0]`, or the bare name it starts with.
_STEP = re.compile(r"\.(\w+)|\['([^']*)'\]|\[\"([^\"]*)\"\]|\[(-?\d+)\]|^(\w+)")
# Attributes through which nn.Module keeps its children and tensors: the key after them is the path segment.
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def _segments(source: str) -> list[str]:
    prev = None
    while prev != source:
        prev, source = source, _GETATTR.sub(r"\1.\2", source)
    steps = [(m.lastindex, next(g for g in m.groups() if g is not None)) for m in _STEP.finditer(source)]
    # A frame root ("L", "G") followed by subscripts ("['args'][0]") is the object the frame reached the model as,
    # not a part of its path. A bare first name followed by an attribute ("model.layers") is a plain path.
    if len(steps) > 1 and steps[0][0] == 5 and steps[1][0] in (2, 3, 4):
        steps = steps[1:]
        while steps and steps[0][0] in (2, 3, 4):
            steps = steps[1:]
    return [value for i, (kind, value) in enumerate(steps)
            if not (kind == 1 and value in _CONTAINERS and i + 1 < len(steps) and steps[i + 1][0] in (2, 3, 4))]


def module_path(source: str, known: Collection[str] | None = None) -> str | None:
    """The dotted path of a module or tensor named by Dynamo (a source name or an `nn_module_stack` entry).

    known: the model's paths (`dict(model.named_modules())`, or its parameter and buffer names). Then the result is
    the longest tail of the name that is one of them, whatever prefix Dynamo put before it, or None when no tail
    is (a function Dynamo wrapped as a module, a weight a pass derived). Without `known`, the name with its frame
    root ("L['self']", "L['args'][0]", "G['model']") removed.
    """
    segments = _segments(source)
    if known is None:
        return ".".join(segments)
    for start in range(len(segments) + 1):
        path = ".".join(segments[start:])
        if path in known and (path or not segments):
            return path
    return None


def stack_path(sources: Sequence[str], known: Collection[str]) -> str | None:
    """The module path of the innermost entry of an `nn_module_stack` (`sources` outermost first) that names one.

    An inner entry that is not a module of the model is a function transformers wraps as a module
    (`apply_rotary_pos_emb`), which Dynamo names by the global it reached it through
    ("G['__import_transformers_dot_models_dot_llama_dot_modeling_llama'].apply_rotary_pos_emb"): it is named by its
    own name, called, under the module that called it: "model.layers.0.self_attn.apply_rotary_pos_emb()".
    None when no entry is a module of the model.
    """
    function = None
    for source in reversed(sources):
        path = module_path(source, known)
        if path is not None:
            return f"{path}.{function}" if path and function else path or function or ""
        if function is None:
            name = module_path(source).rpartition(".")[2]
            function = f"{name}()" if name.isidentifier() else None
    return None
