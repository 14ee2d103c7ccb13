"""Calibration data for AWQ, GPTQ and SmoothQuant: whatever the user gives, as token-id windows or as rows of the
model's own inputs.

`options={"calibration": ...}` accepts
* token ids: a tensor, or text: a `datasets.Dataset` with a text column or a path to a text file (text needs
  `options["tokenizer"]`, a tokenizer object or the path of a local tokenizer folder). `calibration_windows` turns it
  into a (windows, window_len) LongTensor: the text is tokenized as one stream and cut into consecutive windows,
  `calibration_samples x calibration_seq_len` tokens in all (fewer, with a warning, when the data is shorter; an error
  when it does not fill one window);
* batches of the model's own inputs: a list of dicts (or one dict, e.g. a tokenizer's output), or a
  `datasets.Dataset` with an `input_ids` column, holding `input_ids` and whatever else the model takes
  (`attention_mask`, `token_type_ids`, ...), as tensors or lists. `input_rows` splits them into one dict per
  sequence (at most `calibration_samples` of them, the padding at either end removed, each cut to
  `calibration_seq_len` tokens); `calibration/feeds.py` matches the keys to the graph's inputs by name. This is what
  an encoder (BERT-style, with token types and padding masks) calibrates on.
`load_calibration` picks the form, `fingerprint` hashes either for the keys of the weights calibrated on it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llmcompress.errors import OptionError


class CalibrationWarning(UserWarning):
    """Calibration used less data than asked for, or a layer was quantized without it (and why)."""


_ACCEPTED = ("a tensor of token ids, a datasets.Dataset (a text column, or model inputs with an input_ids column), "
             "a path to a text file, or a list of dicts of model inputs (input_ids, attention_mask, ...) or one such "
             "dict (a tokenizer's output)")


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
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, (list, tuple)):
        if not value:
            return "got an empty list; expected a list of dicts of model inputs"
        for i, batch in enumerate(value):
            if not isinstance(batch, Mapping):
                return f"got a list whose item {i} is {type(batch).__name__}; expected " + _ACCEPTED
            if "input_ids" not in batch:
                return f"batch {i} has no 'input_ids' (keys: {', '.join(map(str, batch)) or 'none'}); each dict " \
                       "holds the model's inputs by name, input_ids among them"
        return None
    return f"got {type(value).__name__}; expected " + _ACCEPTED


def is_model_inputs(value: Any) -> bool:
    """Whether `value` holds batches of the model's own inputs (rather than token ids or text)."""
    return isinstance(value, (list, tuple, Mapping)) or (_is_dataset(value) and "input_ids" in value.column_names)


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


def _numeric(value: Any) -> torch.Tensor | None:
    """A tensor of `value` (tensor, number, nested lists, numpy), or None for what no graph input can take (text)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):  # lists of strings, ragged lists
        return None
    return t


def _batches(calibration: Any, samples: int) -> Any:
    if isinstance(calibration, Mapping):
        return [calibration]  # one batch: a tokenizer's output
    if isinstance(calibration, (list, tuple)):
        return calibration
    # A Dataset holds one sequence per row: each row is a batch of one.
    return calibration.select(range(min(len(calibration), samples)))


def input_rows(calibration: Any, samples: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """One dict per sequence, {input name: its value without the batch dimension}, at most `samples` of them.

    Values aligned with the tokens (first dimension = the row's input_ids length) are cut to `seq_len` tokens; text
    and other non-numeric values are left out (no graph input takes them). Raises `OptionError` naming the batch
    and key when input_ids is not (seq,) / (batch, seq) integers or a value's batch size differs from input_ids'.
    """
    if samples < 1 or seq_len < 1:
        raise OptionError(f"options: calibration_samples and calibration_seq_len must be >= 1, got {samples}, "
                          f"{seq_len}")
    problem = describe_calibration(calibration)
    if problem is not None:
        raise OptionError(f"options: key 'calibration': {problem}")
    rows: list[dict[str, torch.Tensor]] = []
    for i, batch in enumerate(_batches(calibration, samples)):
        ids = _numeric(batch["input_ids"])
        if ids is None or ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
            raise OptionError(f"options: key 'calibration': batch {i}: input_ids must be integers of shape (seq,) or "
                              f"(batch, seq), got {_describe(batch['input_ids'])}")
        single = ids.dim() == 1
        ids = ids[None] if single else ids
        b, s = ids.shape
        values = {}
        for key, value in batch.items():
            t = ids if key == "input_ids" else _numeric(value)
            if t is None:
                continue
            t = t[None] if single and key != "input_ids" else t
            if t.dim() == 0 or t.shape[0] != b:
                raise OptionError(f"options: key 'calibration': batch {i}: {key!r} has shape {tuple(t.shape)}; its "
                                  f"first dimension must be input_ids' batch size {b}")
            values[str(key)] = t
        for r in range(b):
            start, end = _real_span(values, r, s)
            if end <= start:
                continue
            rows.append({k: v[r][start:end][:seq_len] if v.dim() > 1 and v.shape[1] == s else v[r]
                         for k, v in values.items()})
            if len(rows) == samples:
                return rows
    if not rows:
        raise OptionError("options: key 'calibration' holds no sequence (every input_ids is empty)")
    warnings.warn(f"llmcompress: calibration data holds {len(rows)} sequences instead of the {samples} asked for "
                  "(calibration_samples)", CalibrationWarning, stacklevel=3)
    return rows


def _real_span(values: dict[str, torch.Tensor], r: int, s: int) -> tuple[int, int]:
    """[start, end) of row r's tokens without the padding at either end (attention_mask 0 there): the feeds pad
    again as the graph needs, and a graph without a mask input then never sees the data's padding as tokens."""
    mask = values.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] != s:
        return 0, s
    real = torch.nonzero(mask[r]).flatten()
    return (int(real[0]), int(real[-1]) + 1) if real.numel() else (0, 0)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    return type(value).__name__


CalibrationData = torch.Tensor | list[dict[str, torch.Tensor]]
"""Token windows (n, window_len), or rows of the model's own inputs (`input_rows`)."""


def load_calibration(calibration: Any, tokenizer: Any, samples: int, seq_len: int) -> CalibrationData:
    """The calibration option as token windows, or as rows of model inputs when it holds batches of them."""
    if is_model_inputs(calibration):
        return input_rows(calibration, samples, seq_len)
    return calibration_windows(calibration, tokenizer, samples, seq_len)


def fingerprint(data: CalibrationData) -> str:
    """A short hash of the calibration data (tokens, or every value of every row with its name): part of the key of
    every calibrated weight cached from it."""
    if isinstance(data, torch.Tensor):
        return hashlib.sha256(data.numpy().tobytes() + str(tuple(data.shape)).encode()).hexdigest()[:16]
    h = hashlib.sha256(b"rows")
    for row in data:
        for key in sorted(row):
            v = row[key].contiguous()
            h.update(f"{key}:{v.dtype}:{tuple(v.shape)};".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bfloat16 included
        h.update(b"|")
    return h.hexdigest()[:16]
