"""Calibration data for AWQ, GPTQ and SmoothQuant: whatever the user gives, as token-id windows.

`options={"calibration": ...}` accepts a tensor of token ids, a `datasets.Dataset` with a text column, or a path to
a text file; the last two need `options["tokenizer"]` (a tokenizer object, or the path of a local tokenizer folder).
`calibration_windows` turns it into a (windows, window_len) LongTensor: the text is tokenized as one stream and cut
into consecutive windows, `calibration_samples × calibration_seq_len` tokens in all (fewer, with a warning, when the
data is shorter; an error when it does not fill one window).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from llmcompress.errors import OptionError


class CalibrationWarning(UserWarning):
    """Calibration used less data than asked for, or a layer was quantized without it (and why)."""


def describe_calibration(value: Any) -> str | None:
    """None if `value` is an accepted calibration source, else what is wrong with it."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int64, torch.int32) or value.dim() not in (1, 2):
            return f"a tensor of token ids must be int64/int32 of 1 or 2 dims, got {value.dtype} {tuple(value.shape)}"
        return None
    if _is_dataset(value):
        return None
    return (f"got {type(value).__name__}; expected a tensor of token ids, a datasets.Dataset with a text column, "
            "or a path to a text file")


def _is_dataset(value: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(value, datasets.Dataset)


def _tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise OptionError("options: key 'calibration' is text (a dataset or a text file): give options['tokenizer'] "
                          "(a tokenizer, or the path of a local tokenizer folder)")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except (OSError, ValueError) as e:
            raise OptionError(f"options: key 'tokenizer' got {str(tokenizer)!r}: cannot load a tokenizer: {e}") from e
    if not callable(getattr(tokenizer, "encode", None)):
        raise OptionError(f"options: key 'tokenizer' got {type(tokenizer).__name__}; expected a tokenizer with "
                          ".encode, or the path of a tokenizer folder")
    return tokenizer


def _stream(calibration: Any, tokenizer: Any) -> torch.Tensor:
    """All the calibration tokens as one 1-D int64 tensor."""
    problem = describe_calibration(calibration)
    if problem is not None:
        raise OptionError(f"options: key 'calibration': {problem}")
    if isinstance(calibration, torch.Tensor):
        return calibration.reshape(-1).to(torch.int64).cpu()
    tok = _tokenizer(tokenizer)
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration).expanduser()
        if not path.is_file():
            raise OptionError(f"options: key 'calibration' got {str(calibration)!r}: no such text file")
        texts = [path.read_text(encoding="utf-8")]
    else:
        column = "text" if "text" in calibration.column_names else next(
            (c for c, f in calibration.features.items() if getattr(f, "dtype", None) == "string"), None)
        if column is None:
            raise OptionError(f"options: key 'calibration': the dataset has no text column "
                              f"(columns: {', '.join(calibration.column_names)})")
        texts = [t for t in calibration[column] if t]
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text, add_special_tokens=False))
    return torch.tensor(ids, dtype=torch.int64)


def calibration_windows(calibration: Any, tokenizer: Any, samples: int, window: int) -> torch.Tensor:
    """(n, window) int64 token ids: consecutive windows, n = samples (fewer when the data runs out)."""
    if samples < 1 or window < 1:
        raise OptionError(f"options: calibration_samples and calibration_seq_len must be >= 1, got {samples}, {window}")
    stream = _stream(calibration, tokenizer)
    n = min(samples, stream.numel() // window)
    if n == 0:
        raise OptionError(f"options: key 'calibration' holds {stream.numel()} tokens, fewer than one window of "
                          f"{window} (calibration_seq_len); give more data or a shorter calibration_seq_len")
    if n < samples:
        warnings.warn(f"llmcompress: calibration data holds {stream.numel()} tokens: {n} windows of {window} "
                      f"instead of the {samples} asked for (calibration_samples)", CalibrationWarning, stacklevel=3)
    return stream[: n * window].reshape(n, window)


def fingerprint(windows: torch.Tensor) -> str:
    """A short hash of the calibration tokens: part of the key of every calibrated weight cached from them."""
    return hashlib.sha256(windows.numpy().tobytes() + str(tuple(windows.shape)).encode()).hexdigest()[:16]
