"""Build a transformers causal LM for analysis, on the meta device by default: `load_model`.

On the meta device only the config is read and no weight is allocated or loaded, so a 70B config builds in about a
second with no memory; the cost model needs shapes and dtypes, not values. Nothing is ever fetched from a hub: the
path must exist locally.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmcompress.errors import LLMCompressError, did_you_mean


class ModelLoadError(LLMCompressError, ValueError):
    """A model path is missing or unreadable, its config is malformed, or it is not a causal language model."""


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`torch.bfloat16`, "bfloat16", "bf16", "torch.float16" ... -> a floating torch.dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        known = ["bfloat16", "float16", "float32", "float64", *_DTYPE_ALIASES]
        raise ModelLoadError(f"dtype: unknown floating dtype {dtype!r}{did_you_mean(name, known)}; expected e.g. "
                             "bfloat16, float16, float32")
    return value


def config_path(path: str | Path) -> Path:
    """The config.json a model folder (or a config file path) names; raises `ModelLoadError` when there is none."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist (expected a local model folder with a "
                             "config.json, or a config .json file)")
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise ModelLoadError(f"model folder {str(path)!r} has no config.json")
    elif not p.is_file():
        raise ModelLoadError(f"model path {str(path)!r} is neither a folder nor a file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {str(p)!r}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{str(p)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(f"{str(p)!r} is not a transformers config (no 'model_type' key)")
    return p


def load_config(path: str | Path) -> Any:
    """The `PretrainedConfig` of a local model folder or config .json file."""
    import transformers

    p = config_path(path)
    try:
        return transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise ModelLoadError(f"cannot build a config from {str(p)!r}: {e}") from e


def load_model(path: str | Path, device: str | torch.device = "meta", dtype: torch.dtype | str | None = None,
               config: Any = None) -> torch.nn.Module:
    """A transformers causal LM from a local folder with config.json, or from a path to a config .json file.

    device: "meta" (default) builds the architecture from the config alone: no weight is read or allocated.
        Another device loads the folder's weights when it has them (random initialisation from a bare config).
    dtype: the parameters' dtype; default the config's `dtype` (`torch_dtype`), float32 when it names none.
    config: build from this config instead of the path's (weights are then never loaded).
    Returns the model in eval mode. Raises `ModelLoadError` for a missing or unreadable path, a malformed config, or
    a config transformers has no causal LM class for.
    """
    import transformers

    from_path = config is None
    config = load_config(path) if from_path else config
    dtype = parse_dtype(dtype) or parse_dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)) \
        or torch.float32
    device = torch.device(device)
    folder = Path(path).expanduser()
    try:
        if device.type == "meta" or not from_path or not folder.is_dir() or not _has_weights(folder):
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                                      local_files_only=True).to(device)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ModelLoadError(f"{str(path)!r} (model_type {config.model_type!r}) is not a causal language model "
                                 "transformers knows (AutoModelForCausalLM has no class for it)") from e
        raise ModelLoadError(f"cannot build a model from {str(path)!r}: {e}") from e
    return model.eval()


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or \
        (folder / "model.safetensors.index.json").is_file()


def model_name(path: str | Path) -> str:
    """A short display name: the folder's name (or the config file's folder)."""
    p = Path(path).expanduser().resolve()
    return p.name if p.is_dir() else p.parent.name if p.name == "config.json" else p.stem
