"""What every benchmark's JSON records about the run (device, commit, versions) and how it is written: one place, so
the results files agree on their keys. Benchmarks written before it still carry their own copies."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch


def run_info(root: Path, threads: int | None = None) -> dict:
    """{"device", "commit" (short hash of root's HEAD, "" outside a checkout), "versions", ["threads"]}."""
    import transformers

    from llmcompress.cost.device_profile import device_name

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=root, capture_output=True,
                            text=True).stdout.strip()
    info = {"device": device_name(), "commit": commit,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()}}
    if threads is not None:
        info["threads"] = threads
    return info


def write_results(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
