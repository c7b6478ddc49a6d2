"""The interface every architecture adapter implements.

An adapter knows three things about a model family: where its self-attention modules are, how to
compute the projector's input (the layer-0 normalised token embeddings), and how to *replay* an
attention module from a given map: ``out = o_proj(A @ v_proj(h))`` with no Q/K projection, no rotary
embedding and no softmax. Everything else (recording, lookup, mixing hits and misses) is generic.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

    def attend(self, module: nn.Module, hidden: torch.Tensor, v: torch.Tensor, heads: list[int], kwargs: dict,
               shape: Shape) -> torch.Tensor:
        """Exact attention output [b, len(heads), T, d] of the given query heads only.

        Computes the Q rows of those heads and the K of their KV groups (``v`` is all KV heads).
        """
        b, t, _ = hidden.shape
        d, g = shape.head_dim, shape.group
        groups = sorted({h // g for h in heads})
        q = _linear_rows(getattr(module, self.q_proj), hidden, heads, d).view(b, t, len(heads), d).transpose(1, 2)
        k = _linear_rows(getattr(module, self.k_proj), hidden, groups, d).view(b, t, len(groups), d).transpose(1, 2)
        q, k = self.position(module, q, k, kwargs)
        pick = torch.tensor([groups.index(h // g) for h in heads], device=hidden.device)
        k = k.index_select(1, pick)
        vs = v.index_select(1, torch.tensor([h // g for h in heads], device=hidden.device))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, vs, attn_mask=mask, is_causal=mask is None and self.causal and t > 1,
                                              scale=module.scaling)

    def position(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, kwargs: dict):
        """Per-head norms and position encoding applied to Q/K inside attention (none for BERT)."""
        return q, k

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


def apply_head_maps(maps: torch.Tensor, v: torch.Tensor, kv_of_head: torch.Tensor) -> torch.Tensor:
    """A @ V for a subset of query heads: maps [n, L, L], v [H_kv, L, d], kv_of_head [n] -> [n, L, d]."""
    vs = v.index_select(0, kv_of_head)
    if vs.dtype != maps.dtype:
        return torch.bmm(maps, vs.to(maps.dtype)).to(v.dtype)
    return torch.bmm(maps, vs)


_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lin -> {(heads, d): (weight rows, bias rows)}


def _linear_rows(lin: nn.Linear, x: torch.Tensor, heads: list[int], d: int) -> torch.Tensor:
    """The output columns of ``lin`` belonging to ``heads`` (head_dim ``d`` each), computing only those.

    The selected weight rows are kept per module and head set (a policy uses the same few sets on every
    forward; copying them each time would cost as much as the product on short inputs)."""
    per = _ROWS.setdefault(lin, {})
    key = (tuple(heads), d, lin.weight.data_ptr(), lin.weight._version)
    wb = per.get(key)
    if wb is None:
        idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads]).to(lin.weight.device)
        wb = (lin.weight.detach().index_select(0, idx),
              lin.bias.detach().index_select(0, idx) if lin.bias is not None else None)
        if len(per) > 64:
            per.clear()
        per[key] = wb
    return F.linear(x, *wb)
