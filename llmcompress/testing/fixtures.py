"""The trained fixtures in ../shared/fixtures (`tiny-llama`, `tiny-mixtral`, `pydoc-corpus`): where they are, a model
loaded as the fixtures README measures it, corpus windows, and that README's perplexity. The fixture tests and the
quality and calibration benchmarks share them, so they all measure the same way."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

WINDOW = 512
"""Tokens per window, the fixtures README's."""


def fixtures_dir() -> Path:
    """`$LLMCOMPRESS_FIXTURES`, else `shared/fixtures` beside the checkout."""
    default = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
    return Path(os.environ.get("LLMCOMPRESS_FIXTURES", default))


def missing(fixtures: Path) -> str | None:
    """Why the fixtures cannot be used, or None."""
    if (fixtures / "pydoc-corpus").is_dir():
        return None
    return f"fixtures not found at {fixtures}: run with ../shared beside the checkout or set LLMCOMPRESS_FIXTURES"


def load_model(fixtures: Path, name: str) -> torch.nn.Module:
    """A fixture model in float32 (upcast from the stored bf16), eval mode, no gradients."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(fixtures / name, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def load_tokenizer(fixtures: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(fixtures / "pydoc-corpus" / "tokenizer")


def corpus_windows(fixtures: Path, tokenizer, file: str, n: int | None = None, length: int = WINDOW) -> torch.Tensor:
    """(n, length) token ids from the start of `pydoc-corpus/<file>`, non-overlapping; all whole windows when n is
    None. Only the text n windows need is tokenized (at most 8 characters a token: tokenizing train.txt whole takes
    a while)."""
    text = (fixtures / "pydoc-corpus" / file).read_text(encoding="utf-8")
    if n is not None:
        text = text[: n * length * 8]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    available = ids.numel() // length
    if n is not None and available < n:
        raise ValueError(f"pydoc-corpus/{file}: {ids.numel()} tokens, fewer than {n} windows of {length}")
    n = available if n is None else n
    return ids[: n * length].view(n, length)


def perplexity(model, windows: torch.Tensor, batch: int = 1) -> float:
    """The fixtures README's method: the loss averaged over each window's predicted positions, perplexity = exp of
    the mean window loss. `batch` windows go through the model at a time."""
    losses = []
    with torch.no_grad():
        for chunk in windows.split(batch):
            logits = model(chunk).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), chunk[:, 1:], reduction="none")
            losses.extend(loss.mean(dim=1).tolist())
    return math.exp(sum(losses) / len(losses))


def spread_windows(fixtures: Path, tokenizer, file: str, n: int, length: int = WINDOW) -> torch.Tensor:
    """(n, length) token ids from n evenly spaced places of `pydoc-corpus/<file>` (each window the first `length`
    tokens of the text from a line start there). The first n windows of train.txt cover two or three documents:
    early-exit gates whose thresholds were set on them kept 0.993 agreement there but 0.97-0.98 on validation.txt."""
    text = (fixtures / "pydoc-corpus" / file).read_text(encoding="utf-8")
    step = (len(text) - length * 8) // n
    rows = []
    for i in range(n):
        start = text.find("\n", i * step) + 1
        ids = tokenizer(text[start: start + length * 8], return_tensors="pt").input_ids[0]
        if ids.numel() < length:
            raise ValueError(f"pydoc-corpus/{file}: {ids.numel()} tokens at offset {start}, fewer than {length}")
        rows.append(ids[:length])
    return torch.stack(rows)
