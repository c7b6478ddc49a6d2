"""Llama-family decoders: Llama, Mistral, Qwen2, Qwen2-MoE, Qwen3, Gemma3 (text).

All of them compute ``q_proj/k_proj/v_proj -> (q/k norm) -> rotary -> attention -> o_proj``; a hit
keeps only ``v_proj`` and ``o_proj``. Gemma3's sliding-window layers need nothing special: the
recorded map already carries the window, and a top-left crop of a causal map is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Shape


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "gemma3_text", "gemma3")
    causal = True

    def _text_config(self, config):
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def shape(self, config) -> Shape:
        c = self._text_config(config)
        n_heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
        return Shape(c.num_hidden_layers, n_heads, c.num_key_value_heads or n_heads, head_dim)

    def _decoder(self, model: nn.Module) -> nn.Module:
        m = model.base_model
        # Gemma3ForConditionalGeneration wraps the text model one level deeper.
        return getattr(m, "language_model", m)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self._decoder(model).layers]

    def position(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, kwargs: dict):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if hasattr(module, "q_norm"):  # Qwen3, Gemma3: per-head RMSNorm before rotary
            q, k = module.q_norm(q), module.k_norm(k)
        cos, sin = kwargs["position_embeddings"]
        return apply_rotary_pos_emb(q, k, cos, sin)

    def token_features(self, model: nn.Module, input_ids: torch.Tensor, **kw) -> torch.Tensor:
        dec = self._decoder(model)
        emb = dec.embed_tokens(input_ids)  # Gemma3's embedding applies its own scale
        return dec.layers[0].input_layernorm(emb)
