"""The `llmcompress` logger; `LLMCOMPRESS_LOG=debug` (or info, warning) turns on its output."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("llmcompress")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_from_env() -> None:
    """Attach a stderr handler at the level named by `LLMCOMPRESS_LOG`, once."""
    level = os.environ.get("LLMCOMPRESS_LOG", "").strip().lower()
    if not level:
        return
    if level in ("1", "true", "yes"):
        level = "debug"
    if level not in _LEVELS:
        raise ValueError(f"LLMCOMPRESS_LOG={level!r}: expected one of {sorted(_LEVELS)}")
    logger.setLevel(_LEVELS[level])
    if not any(getattr(h, "_llmcompress", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[llmcompress %(levelname)s] %(message)s"))
        handler._llmcompress = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
