import pytest

from llmcompress.cli import main


def test_passes_and_recipes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "canonicalize" in out and "[llmcompress]" in out
    assert main(["recipes"]) == 0
    assert "passes: canonicalize" in capsys.readouterr().out


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
