"""The cheaper precisions a verified pass can run in (``tasks.verify``), and the probe that says
whether a device has one natively.

Two shapes of the same precision:

- ``bfloat16`` / ``float16``: the whole model cast, every activation and the logits rounded too;
- ``bfloat16-linears`` / ``float16-linears``: only the decoder's linear layers (the projections and
  the MLP, where a prefill's matmul time goes) take their inputs and weights in the cheap dtype;
  the residual stream, norms, attention and the output head stay in float32. The matmuls keep
  their speed, while the gaps between choices move about a third as far (SmolLM2 on MMLU 5-shot:
  0.079 against 0.208 log-prob), so about half as many rows rerun. The head stays whole because
  rounding the logits themselves is the largest single movement (a logit of 15 in bfloat16 is
  known to 1/16).
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..errors import UserError

LINEARS = "-linears"


@dataclass(frozen=True)
class CheapPrecision:
    name: str  # as the user gave it: "bfloat16", "bfloat16-linears", ...
    dtype: torch.dtype
    linears_only: bool  # True: only the linear layers run in ``dtype``


def cheap_precision(name: str) -> CheapPrecision:
    """``bfloat16``, ``float16`` or either with ``-linears``; float32 is not cheaper."""
    base = name.removesuffix(LINEARS)
    if base not in ("bfloat16", "float16"):
        raise UserError(
            f"--cheap-dtype must be bfloat16, float16, bfloat16{LINEARS} or float16{LINEARS}, "
            f"got '{name}'"
        )
    return CheapPrecision(name, models.resolve_dtype(base), name.endswith(LINEARS))


class CheapLinear(nn.Module):
    """A linear layer whose matmul runs in a cheaper dtype between float32 activations: the
    input is rounded to ``dtype``, the product (accumulated in float32 by the CPU and GPU
    kernels) comes back in the caller's dtype."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # what ``models.numerics`` appends, so nothing this layer computed passes as float32's
        self.numerics_tag = f"{models.dtype_name(dtype)}{LINEARS}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


def cheap_copy(model: nn.Module, precision: CheapPrecision | torch.dtype) -> nn.Module:
    """The model in a cheaper precision beside the exact one (a copy: the exact model stays as it
    is). A dtype casts the whole copy; a ``-linears`` precision swaps its linear layers, the
    output head excepted, for ``CheapLinear``. The cast weights are made while copying, so the
    copy never holds a float32 duplicate of them (peak memory: the copy's own size)."""
    if isinstance(precision, torch.dtype):
        precision = CheapPrecision(str(precision), precision, linears_only=False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if precision.linears_only:
        cast = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    else:
        cast = [p for p in model.parameters() if p.is_floating_point()]
    # deepcopy takes these as the copies of the float32 weights (tied ones stay tied)
    memo = {id(p): nn.Parameter(p.detach().to(precision.dtype), False) for p in cast}
    cheap = copy.deepcopy(model, memo)
    if not precision.linears_only:
        return cheap.to(dtype=precision.dtype)  # the buffers; parameters are cast already
    copied_head = cheap.get_output_embeddings() if head is not None else None
    for parent in list(cheap.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not copied_head:
                setattr(parent, name, CheapLinear(child, precision.dtype))
    return cheap


@functools.lru_cache(maxsize=8)
def native_speedup(dtype: torch.dtype, device: str) -> float:
    """How much faster a typical prefill matmul runs in ``dtype`` than in float32 on ``device``,
    timed once per process (as ``kernels.product_dtype`` probes fp16). Below 1 where the device
    emulates it (a CPU without bf16 units): the cheap pass then cannot pay."""
    if device != "cpu":
        if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return 0.0
        return 2.0  # GPUs run half precisions natively; not timed (no sync cost paid here)
    # a linear layer's product, laid out as the model's (``x @ W.T``, W stored [out, in]): an
    # AVX2-only CPU runs ``x @ W`` in bfloat16 some 15x slower still than this
    x, w = torch.randn(512, 576), torch.randn(1536, 576)
    xc, wc = x.to(dtype), w.to(dtype)

    def seconds(a, b) -> float:
        F.linear(a, b)  # first call: allocation, kernel selection
        t0 = time.perf_counter()
        for _ in range(5):
            F.linear(a, b)
        return time.perf_counter() - t0

    return float(np.clip(seconds(x, w) / max(seconds(xc, wc), 1e-9), 0.0, 100.0))
