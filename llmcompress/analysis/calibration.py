"""Calibration profiles: measured bandwidth, launch overhead and matmul efficiency of the current device.

`load_profile(hardware)` returns the stored profile for the current device (or None); the cost model then uses it
instead of datasheet peaks. `llmcompress calibrate` writes one (see `calibrate`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .hardware import Hardware

PROFILE_DIR = Path(__file__).parent / "profiles"


def device_key() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def profile_path(key: str | None = None) -> Path:
    override = os.environ.get("LLMCOMPRESS_PROFILE_DIR")
    return (Path(override) if override else PROFILE_DIR) / f"{key or device_key()}.json"


def load_profile(hardware: Hardware) -> dict[str, Any] | None:
    """The calibration profile of the current device if one is stored and matches `hardware`'s kind."""
    if hardware.kind == "cuda" and not torch.cuda.is_available():
        return None
    path = profile_path()
    if not path.is_file():
        return None
    profile = json.loads(path.read_text())
    return profile if profile.get("hardware") == hardware.name else None
