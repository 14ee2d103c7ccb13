"""Calibration on the CPU: the profile's keys and numbers, where it is stored and found, and that the cost model
uses it (checked by arithmetic on the stored numbers, never by a second timing, which a shared machine makes noisy)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from llmcompress.cli import main
from llmcompress.cost.device_profile import (
    QUICK_GRID,
    Grid,
    bandwidth_at,
    load_profile,
    matmul_correction,
    profile_device,
    profile_path,
)
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.errors import OptionError

CPU = HARDWARE["cpu"]
aten = torch.ops.aten
TOP_KEYS = {"profile_version", "hardware", "device", "device_key", "versions", "created", "quick", "grid", "method",
            "bandwidth_bytes_per_s", "launch_overhead_s", "copy", "matmul", "cpu_weight_only"}
POINT_KEYS = {"m", "n", "k", "time_s", "roofline_time_s", "measured_s", "datasheet_s", "efficiency", "tflops", "gbps"}


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    torch.manual_seed(0)
    return profile_device("cpu", quick=True, out=tmp_path_factory.mktemp("profiles") / "cpu.json")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_profile_has_documented_keys(profile):
    stored = json.loads(open(profile["path"]).read())
    assert set(stored) == TOP_KEYS  # `path` is returned, not stored
    assert stored["hardware"] == "cpu" and stored["device_key"] == "cpu" and stored["quick"] is True
    assert set(stored["versions"]) >= {"torch", "triton", "cuda"} and stored["versions"]["torch"] == torch.__version__
    assert stored["grid"] == {"m": list(QUICK_GRID.m), "nk": [list(p) for p in QUICK_GRID.nk]}
    assert _positive(stored["bandwidth_bytes_per_s"]) and _positive(stored["launch_overhead_s"])
    copies = stored["copy"]
    assert [c["bytes"] for c in copies] == sorted(c["bytes"] for c in copies) and copies[0]["bytes"] == 2 << 16
    assert copies[-1]["bandwidth_bytes_per_s"] == stored["bandwidth_bytes_per_s"]  # the large copy ends the curve
    assert all(_positive(c[key]) for c in copies for key in c)
    points = stored["matmul"]["bfloat16"]
    assert [(p["m"], p["n"], p["k"]) for p in points] == QUICK_GRID.shapes()  # sorted by M, then grid (N, K) order
    for p in points:
        assert set(p) == POINT_KEYS
        assert all(_positive(p[key]) for key in POINT_KEYS), p
        assert p["time_s"] <= p["measured_s"]


def test_cpu_profile_measures_the_weight_only_kernels(profile):
    """torch's packed CPU kernels at M = 1: bandwidth = weight bytes / (time - launch), and the CPU kernel choice of
    quantize-linear prices the packed weight at that bandwidth (arithmetic, no second timing)."""
    from llmcompress.kernels.cpu_path import choose_cpu_kernel, weight_stream_bandwidth

    entries = profile["cpu_weight_only"]
    assert set(entries) == {"int8", "int4", "bfloat16"}
    n, k = entries["int8"]["n"], entries["int8"]["k"]
    assert entries["int8"]["weight_bytes"] == n * k + 2 * n
    assert entries["int4"]["weight_bytes"] == n * k // 2 + (k // 128) * n * 2 * 2
    assert entries["bfloat16"]["weight_bytes"] == 2 * n * k
    for e in entries.values():
        t = e["measured_s"] - profile["launch_overhead_s"]
        assert math.isclose(e["bandwidth_bytes_per_s"], e["weight_bytes"] / max(t, 0.05 * e["measured_s"]))
    model = CostModel(CPU, profile)
    assert weight_stream_bandwidth(model, "int8") == entries["int8"]["bandwidth_bytes_per_s"]
    choice = choose_cpu_kernel(model, "int8", 4096, 4096, torch.bfloat16, 4096 * 4096 + 2 * 4096, 4096 * 4100)
    t1 = choice.priced["m=1"]["packed_s"]
    weight_s = (4096 * 4096 + 2 * 4096) / entries["int8"]["bandwidth_bytes_per_s"]
    act_s = (4096 + 4096) * 2 / profile["bandwidth_bytes_per_s"]
    assert math.isclose(t1, max(weight_s + act_s, 2 * 4096 * 4096 / CPU.peak_flops["bfloat16"]) + model.launch_s,
                        rel_tol=1e-9)
    # The choice follows the prices (which one wins depends on this machine's timings, not asserted here).
    assert choice.packed == all(p["packed_s"] <= p["reference_s"] for p in choice.priced.values())


def test_load_profile_finds_it_through_env(profile, monkeypatch):
    monkeypatch.setenv("LLMCOMPRESS_PROFILE_DIR", str(Path(profile["path"]).parent))
    loaded = load_profile(CPU)
    assert loaded == {k: v for k, v in profile.items() if k != "path"}
    assert load_profile(dataclasses.replace(CPU, name="other-cpu")) is None  # calibrates another row
    if not torch.cuda.is_available():
        assert load_profile(HARDWARE["h100-sxm"]) is None


def test_calibrate_writes_to_profile_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMPRESS_PROFILE_DIR", str(tmp_path))
    written = profile_device("cpu", grid=Grid((1,), ((64, 64),)), quick=True)
    assert written["path"] == str(tmp_path / "cpu.json") == str(profile_path("cpu"))
    assert load_profile(CPU)["matmul"]["bfloat16"][0]["m"] == 1


def _linear_node(m: int, n: int, k: int):
    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    gm = make_fx(torch.nn.functional.linear, tracing_mode="fake")(x, w)  # t + mm, what the captured graph holds
    [node] = [n for n in gm.graph.nodes if n.target is aten.mm.default]
    return node


def test_calibrated_model_reproduces_its_points(profile):
    calibrated, datasheet = CostModel(CPU, profile), CostModel(CPU)
    points = profile["matmul"]["bfloat16"]
    firsts = {}
    for p in points:  # the cost model looks up by M alone: the first point at each M is the one it uses
        firsts.setdefault(p["m"], p)
    for p in firsts.values():
        node = _linear_node(p["m"], p["n"], p["k"])
        assert float(calibrated.node_cost(node).time_s) == pytest.approx(p["measured_s"], rel=1e-9)
        assert float(datasheet.node_cost(node).time_s) == pytest.approx(p["datasheet_s"], rel=1e-9)


def test_calibrated_model_uses_measured_bandwidth_and_launch(profile):
    x = torch.randn(1 << 16)
    gm = make_fx(torch.neg, tracing_mode="fake")(x)
    [node] = [n for n in gm.graph.nodes if n.target is aten.neg.default]
    cost = CostModel(CPU, profile).node_cost(node)
    expected = 2 * x.numel() * 4 / profile["bandwidth_bytes_per_s"] + profile["launch_overhead_s"]
    assert float(cost.time_s) == pytest.approx(expected, rel=1e-9)


def test_matmul_correction_lookup():
    def point(m, n, k, ratio):
        return {"m": m, "n": n, "k": k, "time_s": ratio * 1e-6, "roofline_time_s": 1e-6}

    profile = {"hardware": "cpu", "bandwidth_bytes_per_s": 1e10, "launch_overhead_s": 1e-6,
               "matmul": {"bfloat16": [point(1, 4096, 4096, 2.0), point(1, 11008, 4096, 3.0),
                                       point(64, 4096, 4096, 5.0), point(64, 11008, 4096, 7.0)]}}
    # By M alone, as the cost model does: nearest M in log space, first point there.
    assert matmul_correction(profile, "bfloat16", 2) == 2.0
    assert matmul_correction(profile, "bfloat16", 32) == 5.0  # log 32 is nearer log 64 than log 1
    assert CostModel(CPU, profile)._matmul_correction(torch.bfloat16, 32) == 5.0
    # By (M, N, K): the (N, K) shape counts too.
    assert matmul_correction(profile, "bfloat16", 1, 11008, 4096) == 3.0
    assert matmul_correction(profile, "bfloat16", 100, 10000, 4096) == 7.0
    assert matmul_correction(profile, "float16", 1) == 1.0 and matmul_correction(None, "bfloat16", 1) == 1.0


def test_bandwidth_curve_interpolates_in_log_bytes():
    profile = {"bandwidth_bytes_per_s": 3e12, "copy": [{"bytes": 1e6, "bandwidth_bytes_per_s": 1e11},
                                                      {"bytes": 1e8, "bandwidth_bytes_per_s": 1e12}]}
    assert bandwidth_at(profile, 1e3) == 1e11 and bandwidth_at(profile, 1e10) == 1e12  # clamped to the ends
    assert bandwidth_at(profile, 1e7) == pytest.approx(10 ** 11.5)  # halfway in log bytes: halfway in log bandwidth
    assert bandwidth_at({"bandwidth_bytes_per_s": 3e12}, 1e7) == 3e12  # no curve


def test_bad_arguments():
    with pytest.raises(OptionError):
        Grid((0,), ((64, 64),))
    with pytest.raises(OptionError, match="int8"):
        profile_device("cpu", dtypes=("int8",), quick=True, out="unused.json")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="CUDA"):
            profile_device("h100-sxm", quick=True, out="unused.json")


def test_cli_calibrate(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["calibrate", "--hardware", "cpu", "--quick", "--m", "1", "4", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "measured us" in text and "roofline us" in text and "efficiency" in text
    assert len([line for line in text.splitlines() if line.startswith("bfloat16")]) == 2 * len(QUICK_GRID.nk)
    stored = json.loads(out.read_text())
    assert stored["hardware"] == "cpu" and stored["grid"]["m"] == [1, 4]
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--hardware", "no-such-gpu"])
    assert exc.value.code == 2
