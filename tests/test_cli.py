from llmcompress.cli import main


def test_passes_and_recipes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "canonicalize" in out and "[llmcompress]" in out
    assert main(["recipes"]) == 0
    assert "passes: canonicalize" in capsys.readouterr().out
