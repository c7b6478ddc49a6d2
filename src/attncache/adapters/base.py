"""The interface every architecture adapter implements.

An adapter knows three things about a model family: where its self-attention modules are, how to
compute the projector's input (the layer-0 normalised token embeddings), and how to *replay* an
attention module from a given map: ``out = o_proj(A @ v_proj(h))`` with no Q/K projection, no rotary
embedding and no softmax. Everything else (recording, lookup, mixing hits and misses) is generic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


class Adapter:
    name: str = "base"
    model_types: tuple[str, ...] = ()
    causal: bool = True
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

    def output(self, module: nn.Module, heads: torch.Tensor) -> torch.Tensor:
        """Merge heads [b, H_q, T, d] -> [b, T, H_q*d] and apply the output projection, if inside."""
        b, h, t, d = heads.shape
        out = heads.transpose(1, 2).reshape(b, t, h * d)
        if self.o_proj is not None:
            out = getattr(module, self.o_proj)(out)
        return out


def apply_maps(maps: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
    """A @ V with grouped-query heads, no per-head loop.

    maps: [H_q, L, L]; v: [H_kv, L, d] -> [H_q, L, d]. Query head h reads KV head h // group.
    """
    hq, L, Lk = maps.shape
    hkv, _, d = v.shape
    assert hq == hkv * group and v.shape[1] == Lk, (maps.shape, v.shape, group)
    if v.dtype != maps.dtype:
        # Run A @ V in the stored precision: reading fp16 maps as they are is several times faster
        # than converting them (a full-size copy per layer); V is small.
        return apply_maps(maps, v.to(maps.dtype), group).to(v.dtype)
    if group == 1:
        return torch.bmm(maps, v)
    if maps.is_contiguous():
        # The query heads of one KV group are adjacent: stack their rows, one bmm per KV head.
        return torch.bmm(maps.view(hkv, group * L, Lk), v).view(hq, L, d)
    return torch.matmul(maps.view(hkv, group, L, Lk), v.unsqueeze(1)).reshape(hq, L, d)
