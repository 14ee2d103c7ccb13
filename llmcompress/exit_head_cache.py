"""Fitted exit heads as derived weights: `cached_exit_heads` fits a translation once per (model weights,
calibration ids, exit layer, ridge, dtype) and reuses it across calls and recompiles, from memory and, with the disk
cache on, from `weights/` in another process. Keyed by the one helper, `Pass.cache_key` of `FitExitHeads`, through
the process-wide derived-weight cache of `passes/weights.py` (the same one `FrozenWeights.derive` uses).

Model-level, like `exit_heads.py`: the bases are the model's parameters, not graph constants, so an in-place edit
of any weight (its version) or another model (its identity; on disk, its content) fits again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import ClassVar

import torch

from llmcompress.errors import OptionError
from llmcompress.exit_heads import ExitHead, check_exit_layer, check_ids, decoder_parts, fit_exit_heads
from llmcompress.passes.base import Pass
from llmcompress.passes.weight_store import content_hash, hashable_tensor, open_store
from llmcompress.passes.weights import DERIVED, _version

DEFAULT_RIDGE = 1e-2


@dataclasses.dataclass(frozen=True)
class FitExitHeadsOptions:
    ridge: float = DEFAULT_RIDGE
    """λ as a share of the mean diagonal of the centred Gram matrix (`exit_heads.fit_exit_heads`)."""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not self.ridge > 0:
            raise OptionError(f"ridge: {self.ridge!r}; expected a number > 0")


class FitExitHeads(Pass):
    """Owner of the exit heads' cache key (its `uuid()` hashes this module, `exit_heads.py` and the ridge): no graph
    pass, never registered; `run` is not called."""

    name = "fit-exit-heads"
    description = "ridge-fitted translations of exit heads (model-level, for self-speculative decoding)"
    Options = FitExitHeadsOptions


def calibration_digest(calibration: torch.Tensor) -> str:
    """sha256 of the ids' shape and int64 values: the calibration's part of the key."""
    ids = calibration.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(repr(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()[:32]


@torch.no_grad()
def cached_exit_heads(model: torch.nn.Module, calibration: torch.Tensor, exit_layers: Iterable[int] | None = None, *,
                      ridge: float = DEFAULT_RIDGE, disk_cache: bool = True) -> dict[int, ExitHead]:
    """`fit_exit_heads(model, calibration, exit_layers, ridge=ridge)`, each layer's (A_E, b_E) fitted once: the
    layers not cached are fitted together (one forward over the calibration). disk_cache: also look up / store them
    in the derived-weight disk cache (`LLMCOMPRESS_DISK_CACHE=0` turns it off)."""
    parts = decoder_parts(model)
    calibration = check_ids(calibration, "calibration")
    layers = list(range(1, parts.num_layers)) if exit_layers is None else list(exit_layers)
    for e in layers:
        check_exit_layer(e, parts.num_layers)
    owner = FitExitHeads({"ridge": ridge})
    bases = tuple(dict.fromkeys(model.parameters()))  # tied embeddings: once
    store = open_store(disk_cache)
    model_key = _model_key(model, bases) if store is not None else None
    digest = calibration_digest(calibration)
    dtype = parts.lm_head.weight.dtype
    keys = {e: owner.cache_key("translation", e, digest, dtype) for e in layers}
    found = {e: DERIVED.peek(bases, (), keys[e], store, model_key) for e in layers}
    missing = [e for e in layers if found[e] is None]
    fitted = fit_exit_heads(model, calibration, missing, ridge=ridge) if missing else {}
    heads = {}
    for e in layers:
        value = found[e] if found[e] is not None else DERIVED.get(
            bases, (), keys[e], lambda e=e: (fitted[e].weight, fitted[e].bias), store, model_key,
            [f"exit head {e}"])
        heads[e] = ExitHead(e, value[0], value[1])
    return heads


def _model_key(model: torch.nn.Module, bases: tuple[torch.Tensor, ...]) -> str | None:
    """The model's class and the content of every parameter (the disk key's `model` part), or None where a
    parameter has no content to hash (meta, fake)."""
    if not all(hashable_tensor(b) for b in bases):
        return None
    digests = sorted(content_hash(b, _version(b)) for b in bases)
    return hashlib.sha256(" ".join([type(model).__name__, *digests]).encode()).hexdigest()
