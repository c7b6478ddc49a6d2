"""BERT-family encoders (bidirectional): BERT, RoBERTa, XLM-R, MiniLM.

``BertSelfAttention`` holds ``query/key/value`` and returns the merged context; the output dense
layer lives in a sibling module (``BertSelfOutput``), so replay stops at the merged heads.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Shape


class BertAdapter(Adapter):
    name = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")
    causal = False
    q_proj = "query"
    k_proj = "key"
    v_proj = "value"
    o_proj = None

    def shape(self, config) -> Shape:
        h = config.num_attention_heads
        return Shape(config.num_hidden_layers, h, h, config.hidden_size // h)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention.self for layer in model.base_model.encoder.layer]

    def token_features(self, model: nn.Module, input_ids: torch.Tensor, **kw) -> torch.Tensor:
        # The embeddings block ends in LayerNorm: exactly what layer 0's attention reads.
        tti = kw.get("token_type_ids")
        return model.base_model.embeddings(input_ids=input_ids, token_type_ids=tti)
