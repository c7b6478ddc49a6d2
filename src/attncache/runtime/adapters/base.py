"""The interface every architecture adapter implements.

An adapter knows three things about a model family: where its self-attention modules are, how to
compute the projector's input (the layer-0 normalised token embeddings), and how to *replay* an
attention module from a given map: ``out = o_proj(A @ v_proj(h))`` with no Q/K projection, no rotary
embedding and no softmax. Everything else (recording, lookup, mixing hits and misses) is generic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...db.manifest import Shape
from .. import kernels


class Adapter:
    name: str = "base"
    model_types: tuple[str, ...] = ()
    causal: bool = True
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str | None = "o_proj"

    # -- structure -------------------------------------------------------------------------------
    def shape(self, config) -> Shape:
        raise NotImplementedError

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def base_model(self, model: nn.Module) -> nn.Module:
        return model.base_model

    # -- projector input -------------------------------------------------------------------------
    def token_features(self, model: nn.Module, input_ids: torch.Tensor, **kw) -> torch.Tensor:
        """[B, T, D] normalised token embeddings as layer 0's attention sees them."""
        raise NotImplementedError

    # -- replay ----------------------------------------------------------------------------------
    def values(self, module: nn.Module, hidden: torch.Tensor, shape: Shape) -> torch.Tensor:
        """[b, H_kv, T, d] value heads of ``hidden`` [b, T, D]."""
        b, t, _ = hidden.shape
        v = getattr(module, self.v_proj)(hidden)
        return v.view(b, t, shape.n_kv_heads, shape.head_dim).transpose(1, 2)

    def attend(
        self,
        module: nn.Module,
        hidden: torch.Tensor,
        v: torch.Tensor,
        heads: list[int],
        kwargs: dict,
        shape: Shape,
    ) -> torch.Tensor:
        """Exact attention output [b, len(heads), T, d] of the given query heads only.

        Computes the Q rows of those heads and the K of their KV groups (``v`` is all KV heads).
        """
        b, t, _ = hidden.shape
        d, g = shape.head_dim, shape.group
        groups = sorted({h // g for h in heads})
        q = kernels.linear_rows(getattr(module, self.q_proj), hidden, heads, d)
        k = kernels.linear_rows(getattr(module, self.k_proj), hidden, groups, d)
        q = q.view(b, t, len(heads), d).transpose(1, 2)
        k = k.view(b, t, len(groups), d).transpose(1, 2)
        q, k = self.position(module, q, k, kwargs)
        device = str(hidden.device)
        k = k.index_select(
            1, kernels.index_tensor(tuple(groups.index(h // g) for h in heads), device)
        )
        vs = v.index_select(1, kernels.index_tensor(tuple(h // g for h in heads), device))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        causal = mask is None and self.causal and t > 1
        return F.scaled_dot_product_attention(
            q, k, vs, attn_mask=mask, is_causal=causal, scale=module.scaling
        )

    def position(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, kwargs: dict):
        """Per-head norms and position encoding applied to Q/K inside attention (none for BERT)."""
        return q, k

    def output(self, module: nn.Module, heads: torch.Tensor) -> torch.Tensor:
        """Merge heads [b, H_q, T, d] -> [b, T, H_q*d] and apply the output projection, if
        inside."""
        b, h, t, d = heads.shape
        out = heads.transpose(1, 2).reshape(b, t, h * d)
        if self.o_proj is not None:
            out = getattr(module, self.o_proj)(out)
        return out
