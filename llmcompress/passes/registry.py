"""Pass registry: `register_pass`, lookup by name, and discovery of plugins in the `llmcompress.passes` entry-point group.

A plugin's entry point names either a module (importing it registers its passes) or a `Pass` subclass.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import re
import warnings
from typing import TypeVar

from llmcompress.errors import LLMCompressError, OptionError, did_you_mean
from llmcompress.passes.base import Pass

ENTRY_POINT_GROUP = "llmcompress.passes"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_PASSES: dict[str, type[Pass]] = {}
_plugins_loaded = False
plugin_errors: dict[str, str] = {}
"""Entry-point name -> why it failed to load (also warned once)."""

P = TypeVar("P", bound=type[Pass])


class PluginWarning(UserWarning):
    """A pass plugin failed to load; the other passes still run."""


def register_pass(cls: P | None = None, *, override: bool = False):
    """Class decorator that makes a `Pass` subclass available by its `name` in recipes and `options["passes"]`."""

    def register(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise LLMCompressError(f"register_pass: {cls!r} is not a subclass of llmcompress.Pass")
        if not _NAME.match(cls.name or ""):
            raise LLMCompressError(f"register_pass: {cls.__qualname__}.name={cls.name!r} must be kebab-case, e.g. 'fuse-norm'")
        if not cls.description:
            raise LLMCompressError(f"register_pass: {cls.__qualname__} needs a one-line `description`")
        if not dataclasses.is_dataclass(cls.Options):
            raise LLMCompressError(f"register_pass: {cls.__qualname__}.Options must be a dataclass")
        existing = _PASSES.get(cls.name)
        if existing is not None and existing is not cls and not override:
            if existing.__module__ == cls.__module__ and existing.__qualname__ == cls.__qualname__:
                pass  # the same class defined again (module reloaded): take the new one
            else:
                raise LLMCompressError(
                    f"register_pass: name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}; "
                    "pass override=True to replace it"
                )
        _PASSES[cls.name] = cls
        return cls

    return register if cls is None else register(cls)


def unregister_pass(name: str) -> None:
    _PASSES.pop(name, None)


def load_plugins(force: bool = False) -> None:
    """Import every entry point of the `llmcompress.passes` group once; a failing one warns and is skipped."""
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Pass) and _PASSES.get(obj.name) is not obj:
                register_pass(obj)
            plugin_errors.pop(ep.name, None)
        except Exception as e:  # noqa: BLE001 - any failure of third-party code must not stop the others
            plugin_errors[ep.name] = f"{type(e).__name__}: {e}"
            warnings.warn(
                f"llmcompress: pass plugin {ep.name!r} ({ep.value}) failed to load and is skipped: "
                f"{type(e).__name__}: {e}",
                PluginWarning,
                stacklevel=2,
            )


def builtin_passes() -> tuple[type[Pass], ...]:
    """The passes that ship with llmcompress, one family per sub-package (the registry sits above them)."""
    from llmcompress.passes.canonicalize import CanonicalizePass
    from llmcompress.passes.early_exit.early_exit import EarlyExitPass
    from llmcompress.passes.fusion.epilogue import FuseLinearEpiloguePass
    from llmcompress.passes.fusion.fold import FoldIntoWeightsPass
    from llmcompress.passes.fusion.pointwise import FusePointwisePass
    from llmcompress.passes.fusion.siblings import FuseSiblingLinearsPass
    from llmcompress.passes.lowrank.lowrank_split import LowrankSplitPass
    from llmcompress.passes.moe.fuse_moe import FuseMoePass
    from llmcompress.passes.moe.moe_prune import MoEPrunePass
    from llmcompress.passes.moe.moe_skip import MoESkipPass
    from llmcompress.passes.quantize.quantize_linear import QuantizeLinearPass
    from llmcompress.passes.sparsify.sparsify_linear import SparsifyLinearPass

    return (CanonicalizePass, FoldIntoWeightsPass, FuseSiblingLinearsPass, FuseLinearEpiloguePass,
            FusePointwisePass, QuantizeLinearPass, SparsifyLinearPass, LowrankSplitPass, MoEPrunePass, MoESkipPass,
            FuseMoePass, EarlyExitPass)


def _load_builtins() -> None:
    for cls in builtin_passes():
        if cls.name not in _PASSES:  # a plugin may have replaced it (override=True)
            register_pass(cls)


def registered_passes() -> dict[str, type[Pass]]:
    """All passes by name: built-ins and plugins."""
    _load_builtins()
    load_plugins()
    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        if name in plugin_errors:
            hint = f" (plugin {name!r} failed to load: {plugin_errors[name]})"
        elif plugin_errors:
            hint = " (plugins that failed to load: " + "; ".join(f"{k}: {v}" for k, v in plugin_errors.items()) + ")"
        else:
            hint = ""
        raise OptionError(f"unknown pass {name!r}{did_you_mean(name, passes)}{hint}; registered passes: "
                          f"{', '.join(passes) or '(none)'}")
    return passes[name]
