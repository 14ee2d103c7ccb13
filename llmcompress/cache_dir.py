"""Where llmcompress keeps what it caches on disk: `$LLMCOMPRESS_CACHE_DIR`, else `$XDG_CACHE_HOME/llmcompress`,
else `~/.cache/llmcompress`. Generated kernels go to `kernels/`, derived weights to `weights/`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder, read from the environment on every call (tests point it at a temporary folder)."""
    root = os.environ.get("LLMCOMPRESS_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec: a relative XDG_CACHE_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "llmcompress"
