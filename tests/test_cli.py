import pytest

from llmcompress.cli import main


def test_passes_and_recipes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "canonicalize" in out and "[llmcompress]" in out
    assert main(["recipes"]) == 0
    assert "passes: canonicalize" in capsys.readouterr().out


def test_cache_ls_and_clear(capsys, tmp_path, monkeypatch):
    import os
    from pathlib import Path

    import torch

    from llmcompress.passes.weight_store import WeightStore, weights_dir

    root = Path(os.environ["LLMCOMPRESS_CACHE_DIR"])  # the per-test folder (conftest)
    store = WeightStore(weights_dir())
    for i, name in enumerate(["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]):
        value = (torch.randint(0, 255, (64, 16), dtype=torch.uint8), torch.randn(64, 1).half() + i)
        assert store.save(f"{i:02x}" + "ab" * 15, value, torch.device("cpu"),
                          {"pass": "quantize-linear", "weights": name})
    (root / "kernels").mkdir()
    (root / "kernels" / "fused_0123.py").write_text("# generated\n")
    sizes = [p.stat().st_size for p in sorted(root.rglob("*.safetensors"))]
    assert main(["cache", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "pass", "size", "created", "(UTC)", "weight"]
    assert lines[1].startswith("00abababab") and "quantize-linear" in lines[1]
    assert lines[1].endswith("model.layers.0.mlp.up_proj.weight") and f"{sizes[0] / 1000:.1f} kB" in lines[1]
    assert lines[2].startswith("01abababab") and lines[2].endswith("model.layers.1.mlp.up_proj.weight")
    assert lines[3] == f"2 derived weights, {sum(sizes) / 1000:.1f} kB in {root / 'weights'}"
    assert lines[4] == f"1 generated kernel sources, 12 B in {root / 'kernels'}"
    assert main(["cache", "clear"]) == 0
    assert f"removed 2 derived weights ({sum(sizes) / 1000:.1f} kB)" in capsys.readouterr().out
    assert not list(root.rglob("*.safetensors")) and not list(root.rglob("*.py"))
    assert main(["cache", "ls"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("0 derived weights, 0 B")


@pytest.mark.slow
def test_full_trace_help_says_how_many_layers_a_report_traces(tmp_path, capsys):
    """`--full-trace`'s help names the number of decoder layers the default report traces, as the report does."""
    import json
    import re

    import transformers

    transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                             dtype="bfloat16").save_pretrained(tmp_path / "deep")  # deeper than the traced layers
    assert main(["report", str(tmp_path / "deep"), "--seq", "4", "--format", "json", "-o", str(tmp_path / "r.json")]) == 0
    traced = json.loads((tmp_path / "r.json").read_text())["trace"]
    assert traced["repeated_from"] == f"model.layers.{traced['layers_traced'] - 1}"  # repeats the last traced layer
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    said = re.search(r"--full-trace trace every decoder layer \(default: trace (\w+) and repeat the last", help_text)
    assert said is not None, help_text
    words = {"two": 2, "three": 3, "four": 4}
    number = int(said.group(1)) if said.group(1).isdigit() else words[said.group(1)]
    assert number == traced["layers_traced"]
