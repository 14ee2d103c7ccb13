"""Options and recipes: every mistake gives one error naming the key, the value and what is allowed."""

from __future__ import annotations

import json

import pytest
import torch

from llmcompress.config import CompileConfig
from llmcompress.errors import OptionError, RecipeError
from llmcompress.recipes import builtin_recipes, load_recipe


def test_defaults():
    config = CompileConfig.from_options(None)
    assert (config.recipe, config.lowering, config.hardware, config.strict, config.verify) == (
        "default", "inductor", "auto", False, False)
    assert "default" in builtin_recipes()
    assert [p.name for p in load_recipe("default").passes] == ["canonicalize", "fold-into-weights", "fuse-sibling-linears",
                                                           "fuse-linear-epilogue", "fuse-pointwise"]


@pytest.mark.parametrize("mode, cudagraphs, autotune", [
    (None, False, False), ("default", False, False), ("reduce-overhead", True, False),
    ("max-autotune", True, True), ("max-autotune-no-cudagraphs", False, True)])
def test_mode_maps_onto_lowering(mode, cudagraphs, autotune):
    for config in (CompileConfig.from_options(None, mode), CompileConfig.from_options({"mode": mode})):
        assert (config.cudagraphs, config.max_autotune) == (cudagraphs, autotune)


@pytest.mark.parametrize("options, message", [
    ({"lowerin": "eager"}, "unknown key 'lowerin' (value 'eager') (did you mean 'lowering'?); allowed keys: calibration, calibration_samples, calibration_seq_len, disk_cache, dump_kernels, hardware, lowering, mode"),
    ({"lowering": "tvm"}, "key 'lowering' got 'tvm' (str); expected 'inductor' | 'eager' | 'triton'"),
    ({"strict": 1}, "key 'strict' got 1 (int); expected bool"),
    ({"verify": {"atol": 1, "tol": 2}}, "a dict may only hold 'atol' and 'rtol'"),
    ({"verify": {"atol": -1.0}}, "tolerances must be >= 0"),
    ({"hardware": "tpu-v9"}, "key 'hardware' got 'tpu-v9'; expected 'auto' or one of a100-40gb"),
    ({"passes": "canonicalize"}, "key 'passes' got 'canonicalize' (str); expected list[str] | dict[str, dict"),
    ({"recipe": 3}, "key 'recipe' got 3 (int); expected str"),
    ({"recipe": "no-such-recipe"}, "not a built-in recipe (default"),
    ({"recipe": "missing.yaml"}, "no such file"),
    ({"mode": "fast"}, "key 'mode' got 'fast'"),
    ({"report": ""}, "expected a file path"),
])
def test_bad_options(options, message):
    with pytest.raises(OptionError) as info:
        CompileConfig.from_options(options)
    assert message in str(info.value)


def test_mode_conflict():
    with pytest.raises(OptionError, match="key 'mode' got 'max-autotune' but torch.compile's mode is 'reduce-overhead'"):
        CompileConfig.from_options({"mode": "max-autotune"}, "reduce-overhead")
    with pytest.raises(OptionError, match="mode: got 'turbo'"):
        CompileConfig.from_options(None, "turbo")


def test_recipe_files(tmp_path):
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("name: mine\npasses:\n  - canonicalize: {activations: false}\nsettings:\n  lowering: eager\n")
    config = CompileConfig.from_options({"recipe": str(yaml_file)})
    assert config.lowering == "eager"
    assert load_recipe(str(yaml_file)).passes[0].options == {"activations": False}
    # options beat the recipe's settings
    assert CompileConfig.from_options({"recipe": str(yaml_file), "lowering": "inductor"}).lowering == "inductor"
    json_file = tmp_path / "mine.json"
    json_file.write_text(json.dumps({"passes": {"canonicalize": {}}}))
    assert [p.name for p in load_recipe(str(json_file)).passes] == ["canonicalize"]


@pytest.mark.parametrize("text, message", [
    ("passes: [canonicalize\n", "cannot parse YAML"),
    ("- canonicalize\n", "expected a mapping with keys name, description, passes, settings"),
    ("passes: [canonicalize]\nextra: 1\n", "unknown key 'extra'"),
    ("name: x\n", "missing key 'passes'"),
    ("passes: canonicalize\n", "'passes' must be a list"),
    ("passes: [{a: {}, b: {}}]\n", "must be a name or a one-key mapping"),
    ("passes: [canonicalize]\nsettings: {report: x.json}\n", "settings key 'report' is not allowed"),
    ("passes: [canonicalize]\nsettings: {lowering: tvm}\n", "key 'lowering' got 'tvm'"),
])
def test_malformed_recipe_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(OptionError) as info:
        CompileConfig.from_options({"recipe": str(path)})
    assert message in str(info.value)


def test_malformed_json_recipe(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{passes: [}")
    with pytest.raises(RecipeError, match="cannot parse JSON"):
        load_recipe(str(path))


def _root_cause(exc):
    while getattr(exc, "inner_exception", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return exc


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("options, message", [
    ({"lowering": "tvm"}, "key 'lowering' got 'tvm'"),
    ({"passes": ["canonicalize", "no-such-pass"]}, "unknown pass 'no-such-pass'; registered passes:"),
    ({"passes": {"canonicalize": {"bogus": 1}}}, "pass 'canonicalize': unknown key 'bogus'"),
    ({"lowering": "eager", "passes": {"fuse-pointwise": {"force": "yes"}}}, "pass 'fuse-pointwise': key 'force' got"),
])
def test_errors_surface_through_torch_compile(options, message, grad):
    """Whatever the grad mode: with gradients required the graph would fall back to eager, after the check."""
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="llmcompress", options=options)
    with pytest.raises(Exception) as info, torch.set_grad_enabled(grad):
        compiled(torch.randn(2, 4))
    cause = _root_cause(info.value)
    assert isinstance(cause, OptionError), repr(cause)
    assert message in str(cause)


def test_pass_options_must_be_a_mapping():
    from llmcompress.passes.canonicalize import CanonicalizePass

    with pytest.raises(OptionError, match="pass 'canonicalize': expected a dict of options, got list"):
        CanonicalizePass(["linear"])


def test_report_accepts_a_path(tmp_path):
    assert CompileConfig.from_options({"report": tmp_path / "r.json"}).report == str(tmp_path / "r.json")
