"""The README's Python snippets run as written, so they cannot rot: each ```python block runs in its own process
(as a user would paste it), in a folder holding `train.txt`, with "path/to/model" naming a tiny random Llama saved
with a byte-level BPE tokenizer trained offline on the README itself. Nothing is fetched and no fixture is needed.

Besides exiting cleanly, a block that compiles with backend="llmcompress" must have reached the backend, and a block
that calls `generate` must have compiled inside it: transformers' `compile_config` path runs eagerly on a CPU and
only logs "unable to meet the criteria for compilation", which a clean exit would hide. The blocks run with the
Triton interpreter off, as on a user's CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL_PLACEHOLDER = "path/to/model"

pytestmark = pytest.mark.slow


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    fence = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in fence.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))

# Run before a block: count the graphs our backend compiles, in all and while `generate` runs.
_PRELUDE = '''
import json, atexit
import torch, transformers
from torch._dynamo.backends import registry
registry.lookup_backend("llmcompress")
_backend = registry._COMPILER_FNS["llmcompress"]
_seen = {"graphs": 0, "graphs_in_generate": 0, "generating": False}
def _spy(gm, example_inputs, **kwargs):
    _seen["graphs"] += 1
    _seen["graphs_in_generate"] += _seen["generating"]
    return _backend(gm, example_inputs, **kwargs)
registry._COMPILER_FNS["llmcompress"] = _spy
_generate = transformers.GenerationMixin.generate
def _generate_spy(self, *args, **kwargs):
    _seen["generating"] = True
    try:
        return _generate(self, *args, **kwargs)
    finally:
        _seen["generating"] = False
transformers.GenerationMixin.generate = _generate_spy
atexit.register(lambda: open("seen.json", "w").write(json.dumps(_seen)))
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with `model/` (a tiny random Llama and its tokenizer) and `train.txt` (the README)."""
    import tokenizers
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("readme")
    text = README.read_text(encoding="utf-8")
    (folder / "train.txt").write_text(text, encoding="utf-8")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    tokenizer.save_pretrained(folder / "model")
    # 1024 positions: the quantization snippet calibrates on 512-token windows.
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder / "model")
    return folder


def test_the_readme_has_its_snippets():
    # A snippet a change of fence or placeholder drops silently would not be tested: count what the test finds.
    assert len(BLOCKS) >= 5
    assert sum(MODEL_PLACEHOLDER in code for _, code in BLOCKS) >= 3
    assert any(".generate(" in code for _, code in BLOCKS)


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_snippet_runs(line, code, workdir, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(_PRELUDE + code.replace(MODEL_PLACEHOLDER, str(workdir / "model")), encoding="utf-8")
    (tmp_path / "train.txt").write_text((workdir / "train.txt").read_text(encoding="utf-8"), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"README.md:{line} failed:\n{output[-4000:]}"
    assert "unable to meet the criteria for compilation" not in output, output[-4000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    if 'backend="llmcompress"' in code:
        assert seen["graphs"] >= 1, f"README.md:{line} never reached the llmcompress backend"
    if ".generate(" in code:
        assert seen["graphs_in_generate"] >= 1, f"README.md:{line}: generate compiled nothing with llmcompress"
