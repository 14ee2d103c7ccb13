"""Tiny random-initialised transformers models of each family the backend must handle (tests and examples)."""

from __future__ import annotations

from collections.abc import Callable

import torch

VOCAB = 96

# family -> (config class, model class, config kwargs); 2 layers, hidden 64, so a compile takes seconds on a CPU.
_COMMON_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                   bos_token_id=0, eos_token_id=1)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _COMMON_DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_COMMON_DECODER, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _COMMON_DECODER),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_COMMON_DECODER, "pad_token_id": 0, "bos_token_id": 0,
                                                  "eos_token_id": 1}),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=128,
                                                word_embed_proj_dim=64, pad_token_id=1)),
    "bert": ("BertConfig", "BertModel", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=128)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_COMMON_DECODER, "num_local_experts": 4,
                                                        "num_experts_per_tok": 2}),
}


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A random-initialised model of `family` (one of `FAMILIES`), in eval mode, gradients off."""
    import transformers

    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    model.requires_grad_(False)
    return model


def example_ids(batch: int = 2, seq: int = 11, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


def main_output(out) -> torch.Tensor:
    """logits for LM heads, last_hidden_state for encoders."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


ModelBuilder = Callable[[], torch.nn.Module]
