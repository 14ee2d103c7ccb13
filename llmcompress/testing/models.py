"""Tiny random-initialised transformers models of each family the backend must handle (tests and examples)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmcompress.errors import did_you_mean

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


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0,
               layers: int | None = None) -> torch.nn.Module:
    """A random-initialised model of `family` (one of `FAMILIES`), in eval mode, gradients off; `layers` overrides
    the 2 layers (early-exit tests need exits between several)."""
    import transformers

    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}{did_you_mean(family, FAMILIES)}; known: {', '.join(FAMILIES)}")
    config_cls, model_cls, kwargs = FAMILIES[family]
    if layers is not None:
        kwargs = {**kwargs, ("n_layer" if "n_layer" in kwargs else "num_hidden_layers"): layers}
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    model.requires_grad_(False)
    return model


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm scales around 1 and shifts around 0, in place: freshly initialised ones are exactly 1 and 0, which
    would hide a wrong fold of them into the next linear."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name or "layer_norm" in name or "LayerNorm" in name):
                noise = torch.randn(p.shape, generator=g)
                p.copy_((1 + 0.5 * noise if name.endswith("weight") else 0.1 * noise).to(p.dtype))
    return model


def example_ids(batch: int = 2, seq: int = 11, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


class MeanPoolingEncoder(torch.nn.Module):
    """A sentence-transformers-style embedder: an encoder's last hidden states mean-pooled over the real tokens (the
    attention mask) and L2-normalised, one vector per sequence (sentence-transformers' Transformer + Pooling +
    Normalize modules, without the dependency)."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)


def tiny_sentence_encoder(dtype: torch.dtype = torch.float32, seed: int = 0) -> MeanPoolingEncoder:
    """The tiny BERT (`FAMILIES["bert"]`) as a mean-pooling sentence embedder, in eval mode, gradients off."""
    return MeanPoolingEncoder(tiny_model("bert", dtype, seed)).eval().requires_grad_(False)


def encoder_batch(batch: int = 4, seq: int = 13, seed: int = 1) -> dict[str, torch.Tensor]:
    """An encoder's inputs as a tokenizer gives them for sentence pairs: token ids, a padding mask (row i holds
    seq - 3 * i real tokens, at least 2) and token types 0 then 1 from the middle of each row's real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    lengths = [max(2, seq - 3 * i) for i in range(batch)]
    mask = torch.zeros(batch, seq, dtype=torch.int64)
    types = torch.zeros(batch, seq, dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        types[i, n // 2:n] = 1
        ids[i, n:] = 0  # the pad token
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def main_output(out) -> torch.Tensor:
    """logits for LM heads, last_hidden_state for encoders."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


ModelBuilder = Callable[[], torch.nn.Module]
