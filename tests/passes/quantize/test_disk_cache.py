"""Calibrated quantization through the disk cache, on the in-repo tiny Llama (fast, unmarked: the README's test
command covers it): a second compile of the same weights, and a new process on a copy of the cache folder, load
GPTQ's results instead of calibrating (the calibration runner does not run) and give bitwise the same logits; the
option and the environment switch turn the cache off; round to nearest writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmcompress.testing import compile_child

ROOT = Path(__file__).resolve().parents[3]
GPTQ = {"passes": {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "method": "gptq", "group_size": 32}}}
RTN = {"passes": {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "group_size": 32}}}


def _child(capsys, tmp_path, options, name):
    """compile_child in this process: (its JSON line, the logits)."""
    torch._dynamo.reset()
    logits = tmp_path / f"{name}.safetensors"
    assert compile_child.main(["--model", "llama", "--options", json.dumps(options), "--logits", str(logits)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return out, load_file(str(logits))["logits"]


def _files(root):
    return sorted(p.name for p in Path(root).rglob("*.safetensors"))


def test_second_compile_loads_gptq_from_disk_without_calibrating(capsys, tmp_path, monkeypatch):
    first, logits = _child(capsys, tmp_path, GPTQ, "first")
    assert first["calibration_runs"] == 1 and first["quantize_stats"]["w4a16 gptq"] == 14
    assert first["derived_weights"]["disk_writes"] == 14 and first["derived_weights"]["disk_hits"] == 0
    assert first["disk_cache_warnings"] == 0
    assert len(_files(os.environ["LLMCOMPRESS_CACHE_DIR"])) == 14
    # A new model with the same weights: new tensors, so the in-memory cache misses and the disk serves them.
    second, again = _child(capsys, tmp_path, GPTQ, "second")
    assert second["calibration_runs"] == 0 and "calibration tokens" not in second["quantize_stats"]
    assert second["disk_cache_warnings"] == 0
    assert second["quantize_stats"]["calibrated: cached"] == 14 and second["quantize_stats"]["w4a16 gptq"] == 14
    # The only computing left: packing loaded codes into torch's CPU layout (cheap; kept in memory only), for
    # bf16/fp16 activations; compile_child's model is float32, which keeps the reference op (nothing to pack).
    packed = second["quantize_stats"].get("cpu: packed", 0)
    assert second["derived_weights"] == {"hits": 0, "misses": packed, "disk_hits": 14, "disk_writes": 0,
                                         "not_persisted": 0}
    assert torch.equal(logits, again)


def test_cache_folder_is_portable_to_a_new_process(capsys, tmp_path):
    """The folder, copied elsewhere (another LLMCOMPRESS_CACHE_DIR, as on another machine), serves a new process:
    keys hold no path, host or address."""
    first, logits = _child(capsys, tmp_path, GPTQ, "first")
    assert first["derived_weights"]["disk_writes"] == 14
    elsewhere = tmp_path / "copied" / "cache"
    shutil.copytree(os.environ["LLMCOMPRESS_CACHE_DIR"], elsewhere)
    shutil.rmtree(os.environ["LLMCOMPRESS_CACHE_DIR"])
    env = {**os.environ, "LLMCOMPRESS_CACHE_DIR": str(elsewhere), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "llmcompress.testing.compile_child", "--model", "llama", "--options",
                          json.dumps(GPTQ), "--logits", str(tmp_path / "second.safetensors")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    second = json.loads(out.stdout.strip().splitlines()[-1])
    assert second["calibration_runs"] == 0
    assert second["derived_weights"]["disk_hits"] == 14
    assert second["derived_weights"]["misses"] == second["quantize_stats"].get("cpu: packed", 0)
    assert torch.equal(logits, load_file(str(tmp_path / "second.safetensors"))["logits"])


@pytest.mark.parametrize("switch", ["option", "env"])
def test_switches_turn_the_disk_cache_off(capsys, tmp_path, monkeypatch, switch):
    options = {**GPTQ, "disk_cache": False} if switch == "option" else GPTQ
    if switch == "env":
        monkeypatch.setenv("LLMCOMPRESS_DISK_CACHE", "0")
    out, _ = _child(capsys, tmp_path, options, "off")
    assert out["calibration_runs"] == 1 and out["derived_weights"]["disk_writes"] == 0
    assert not _files(os.environ["LLMCOMPRESS_CACHE_DIR"])


def test_round_to_nearest_is_not_persisted(capsys, tmp_path):
    out, _ = _child(capsys, tmp_path, RTN, "rtn")
    assert out["quantize_stats"]["w4a16 rtn"] == 14
    assert out["derived_weights"]["disk_writes"] == 0 and out["derived_weights"]["not_persisted"] == 0
    assert not _files(os.environ["LLMCOMPRESS_CACHE_DIR"])


def test_disk_cache_option_is_validated():
    from llmcompress.config import CompileConfig
    from llmcompress.errors import OptionError

    with pytest.raises(OptionError, match="'disk_cache' got 'no'.*expected bool"):
        CompileConfig.from_options({"disk_cache": "no"})

