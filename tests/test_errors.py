"""Every lookup of a user-given name says "did you mean ...?" for a likely misspelling and still lists what is
allowed: recipes, passes, option keys and values, lowering and mode names, hardware rows, quantization schemes and
methods, recipe-file keys, CLI sub-commands and choices (`errors.did_you_mean`, the one helper)."""

from __future__ import annotations

import pytest

from llmcompress.backend.pipeline import pass_manager
from llmcompress.cli import main
from llmcompress.config import CompileConfig
from llmcompress.cost.hardware import resolve
from llmcompress.errors import OptionError, RecipeError, did_you_mean
from llmcompress.options import build
from llmcompress.passes.quantize.quantize_linear import QuantizeLinearOptions
from llmcompress.passes.registry import get_pass
from llmcompress.recipes import load_recipe


def test_did_you_mean_points_at_the_closest_names_only():
    recipes = ["default", "fp8", "w4a16", "w4a16-awq", "w4a16-gptq", "w8a16", "w8a8-smoothquant"]
    assert did_you_mean("w4a16-gtpq", recipes) == " (did you mean 'w4a16-gptq'?)"  # not also w4a16-awq (0.74 < 0.9)
    assert did_you_mean("h100", ["h100-sxm", "h100-pcie", "h200"]) == " (did you mean 'h200' or 'h100-sxm'?)"
    assert did_you_mean("quantize", recipes) == ""  # nothing close: no guess
    assert did_you_mean("w4a16", recipes) == ""  # a valid name is not misspelled


@pytest.mark.parametrize("lookup, suggestion, allowed", [
    (lambda: load_recipe("w4a16-gtpq"), "'w4a16-gptq'", "w8a8-smoothquant"),
    (lambda: get_pass("canonicalise"), "'canonicalize'", "fuse-pointwise"),
    (lambda: CompileConfig.from_options({"recipie": "default"}), "'recipe'", "calibration_seq_len"),
    (lambda: CompileConfig.from_options({"lowering": "inductr"}), "'inductor'", "'eager'"),
    (lambda: CompileConfig.from_options({"mode": "reduce-overheads"}), "'reduce-overhead'", "'max-autotune'"),
    (lambda: CompileConfig.from_options(None, mode="max-autotune-no-cudagraph"), "'max-autotune-no-cudagraphs'",
     "'reduce-overhead'"),
    (lambda: CompileConfig.from_options({"hardware": "h100-sxn"}), "'h100-sxm'", "rtx-4090"),
    (lambda: pass_manager(CompileConfig.from_options({"passes": ["canonicalize", "fuse-pointwsie"]})),
     "'fuse-pointwise'", "quantize-linear"),
    (lambda: resolve("a100-80g"), "'a100-80gb'", "l40s"),
    (lambda: build(QuantizeLinearOptions, {"scheme": "w4a61"}, "pass 'quantize-linear'"), "'w4a16'", "fp8"),
    (lambda: build(QuantizeLinearOptions, {"method": "gtpq"}, "pass 'quantize-linear'"), "'gptq'", "awq"),
    (lambda: build(QuantizeLinearOptions, {"grup_size": 64}, "pass 'quantize-linear'"), "'group_size'", "damp"),
    (lambda: build(QuantizeLinearOptions, {"overrides": {"*.o_proj": {"skp": True}}}, "pass 'quantize-linear'"),
     "'skip'", "group_size"),
], ids=["recipe", "pass", "option key", "lowering", "mode option", "mode argument", "hardware option",
        "pass in passes", "hardware", "scheme", "method", "pass option key", "override key"])
def test_misspelled_names(lookup, suggestion, allowed):
    with pytest.raises(OptionError) as e:
        lookup()
    message = str(e.value)
    assert f"did you mean {suggestion}?" in message
    assert allowed in message  # still lists what is allowed


def test_misspelled_recipe_file_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\npases: [canonicalize]\n")
    with pytest.raises(RecipeError, match=r"unknown key 'pases' \(did you mean 'passes'\?\); allowed keys: .*settings"):
        load_recipe(str(path))


@pytest.mark.parametrize("argv, message", [
    (["reprot", "model"], "invalid choice: 'reprot' (did you mean 'report'?) (choose from 'passes', 'recipes'"),
    (["report", "model", "--format", "jsn"], "invalid choice: 'jsn' (did you mean 'json'?) (choose from 'text'"),
    (["report", "model", "--hardware", "l40"], "unknown hardware 'l40' (did you mean 'l40s' or 'l4'?); expected auto"),
])
def test_cli_misspellings(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
