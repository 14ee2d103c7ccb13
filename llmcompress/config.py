"""`CompileConfig`: the validated form of `torch.compile(..., backend="llmcompress", mode=..., options=...)`.

Precedence: keys in `options` > the recipe's `settings` > the defaults below. `mode` is Dynamo's and maps onto the
lowering (CUDA graphs, Inductor's max-autotune).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch

from llmcompress import options as _options
from llmcompress.errors import OptionError, did_you_mean
from llmcompress.recipes import RECIPE_SETTINGS, load_recipe  # noqa: F401  (RECIPE_SETTINGS: re-exported)

Lowering = Literal["inductor", "eager", "triton"]
LOWERINGS: tuple[str, ...] = ("inductor", "eager", "triton")

# Dynamo's modes -> (cudagraphs, max_autotune)
MODES: dict[str | None, tuple[bool, bool]] = {
    None: (False, False),
    "default": (False, False),
    "reduce-overhead": (True, False),
    "max-autotune": (True, True),
    "max-autotune-no-cudagraphs": (False, True),
}

# Float tolerance of `verify=True`, per output dtype: (atol, rtol).
VERIFY_TOLERANCE = {"float32": (1e-4, 1e-4), "float64": (1e-7, 1e-7), "float16": (1e-2, 1e-2), "bfloat16": (2e-2, 2e-2)}



@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """Options of the llmcompress backend (see README, "Options")."""

    recipe: str = "default"
    """Built-in recipe name or path to a YAML/JSON recipe file."""
    passes: list[str] | dict[str, dict[str, Any]] | None = None
    """Pass names, or {name: {option: value}}, run in place of the recipe's passes."""
    lowering: Lowering = "inductor"
    hardware: str = "auto"
    verify: bool | dict[str, float] = False
    """Compare with the uncompiled graph on the example inputs; a dict gives {"atol": .., "rtol": ..}."""
    strict: bool = False
    """A failing pass raises instead of restoring the graph and warning."""
    report: str | os.PathLike | None = None
    """Path of a JSON file describing what the backend did."""
    release_weights: bool = False
    """Free the storage of dense weights that no compiled graph uses any more (see docs/architecture.md)."""
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    """Dynamo's mode; also accepted here because torch.compile refuses mode= and options= together."""
    dump_kernels: str | os.PathLike | None = None
    """Folder to which every kernel the code generator writes is also copied under a readable name."""
    calibration: Any = None
    """Calibration data for AWQ / GPTQ / SmoothQuant: token ids (tensor), a datasets.Dataset (text, or the model's
    inputs), a text file path, or a list of dicts of the model's inputs (`calibration/data.py`)."""
    tokenizer: Any = None
    """Tokenizer (or the path of a local tokenizer folder) for text calibration data."""
    calibration_samples: int = 128
    """Windows of calibration_seq_len tokens (or sequences of model inputs) to calibrate on."""
    calibration_seq_len: int = 512
    disk_cache: bool = True
    """Keep calibrated derived weights (GPTQ, AWQ, SmoothQuant results) in the cache folder's `weights/` and load
    them in later processes; `LLMCOMPRESS_DISK_CACHE=0` also turns it off (`passes/weight_store.py`)."""
    cudagraphs: bool = dataclasses.field(default=False, init=False)
    max_autotune: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        cudagraphs, max_autotune = MODES[self.mode]
        object.__setattr__(self, "cudagraphs", cudagraphs)
        object.__setattr__(self, "max_autotune", max_autotune)
        if isinstance(self.verify, dict):
            bad = sorted(set(self.verify) - {"atol", "rtol"})
            if bad:
                raise OptionError(f"options: key 'verify' got {self.verify!r}; a dict may only hold 'atol' and 'rtol'")
            if any(v < 0 for v in self.verify.values()):
                raise OptionError(f"options: key 'verify' got {self.verify!r}; tolerances must be >= 0")
        from llmcompress.calibration.data import describe_calibration

        problem = describe_calibration(self.calibration)
        if problem is not None:
            raise OptionError(f"options: key 'calibration' {problem}")
        for key in ("calibration_samples", "calibration_seq_len"):
            if getattr(self, key) < 1:
                raise OptionError(f"options: key {key!r} got {getattr(self, key)!r}; expected an integer >= 1")
        if self.report is not None:
            object.__setattr__(self, "report", os.fspath(self.report))
        if self.dump_kernels is not None:
            object.__setattr__(self, "dump_kernels", os.fspath(self.dump_kernels))
        if self.report is not None and not self.report.strip():
            raise OptionError("options: key 'report' got ''; expected a file path")
        if not self.recipe:
            raise OptionError("options: key 'recipe' got ''; expected a recipe name or file path")
        from llmcompress.cost.hardware import HARDWARE

        if self.hardware != "auto" and self.hardware not in HARDWARE:
            raise OptionError(
                f"options: key 'hardware' got {self.hardware!r}{did_you_mean(self.hardware, ['auto', *HARDWARE])}; "
                f"expected 'auto' or one of {', '.join(sorted(HARDWARE))}"
            )

    def tolerance(self, dtype_name: str) -> tuple[float, float]:
        atol, rtol = VERIFY_TOLERANCE.get(dtype_name, (0.0, 0.0))
        if isinstance(self.verify, dict):
            atol, rtol = self.verify.get("atol", atol), self.verify.get("rtol", rtol)
        return atol, rtol

    @staticmethod
    def from_options(options: Mapping[str, Any] | None, mode: str | None = None) -> CompileConfig:
        """Validate `options` (and the recipe's settings) into a config; raises `OptionError`."""
        if options is not None and not isinstance(options, Mapping):
            raise OptionError(f"options: expected a dict, got {type(options).__name__}")
        if mode not in MODES:
            raise OptionError(f"mode: got {mode!r}{did_you_mean(mode, [m for m in MODES if m])}; expected one of "
                              f"{', '.join(repr(m) for m in MODES)}")
        user = dict(options or {})
        if mode is not None:
            if user.get("mode", mode) != mode:
                raise OptionError(f"options: key 'mode' got {user['mode']!r} but torch.compile's mode is {mode!r}")
            user["mode"] = mode
        recipe_name = user.get("recipe", "default")
        # Validate the key's type before using it to load a file.
        _options.build(CompileConfig, {"recipe": recipe_name}, "options")
        recipe = load_recipe(recipe_name)
        merged = {**recipe.settings, **user}
        return _options.build(CompileConfig, merged, "options")

    def to_json(self) -> dict[str, Any]:
        out = _options.as_dict(self)
        for key in ("calibration", "tokenizer"):  # data and objects: described, not dumped
            v = out[key]
            if isinstance(v, torch.Tensor):
                out[key] = f"tensor {str(v.dtype).removeprefix('torch.')} {tuple(v.shape)}"
            elif v is not None and not isinstance(v, (str, os.PathLike)):
                out[key] = type(v).__name__
            elif v is not None:
                out[key] = os.fspath(v)
        return out
