"""One packed row's attention in one masked call against the same attention computed in parts.

A packed row of the prefix tier holds several questions behind one cached few-shot prompt; its
attention is one SDPA call with a block mask, so the masked-out pairs (one question against
another) are computed and thrown away. In parts: every query against the cached prompt in one
unmasked call, each question against itself causally, the parts merged by the log-sum-exp that
torch's CPU flash kernel returns. Prints per-layer medians and the largest difference.

    python benchmarks/attention_parts.py --out runs/exp/attention_parts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def masked(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def in_parts(q, k, v, past: int, blocks: list[int]):
    """Queries against the past (no mask), each block against itself (causal), merged."""
    out_past, lse_past = FLASH(q, k[:, :, :past], v[:, :, :past])
    outs, lses, at = [], [], 0
    for n in blocks:
        own = slice(past + at, past + at + n)
        o, lse = FLASH(q[:, :, at : at + n], k[:, :, own], v[:, :, own], is_causal=True)
        outs.append(o)
        lses.append(lse)
        at += n
    out_own, lse_own = torch.cat(outs, 2), torch.cat(lses, -1)
    top = torch.maximum(lse_past, lse_own)
    w_past, w_own = (lse_past - top).exp(), (lse_own - top).exp()
    total = w_past + w_own
    merged = out_past.float() * (w_past / total)[..., None]
    merged += out_own.float() * (w_own / total)[..., None]
    return merged.to(q.dtype)


def block_mask(past: int, blocks: list[int], dtype: torch.dtype) -> torch.Tensor:
    width = sum(blocks)
    allowed = torch.zeros(width, past + width, dtype=torch.bool)
    allowed[:, :past] = True
    at = 0
    for n in blocks:
        allowed[at : at + n, past + at : past + at + n] = torch.ones(n, n).tril().bool()
        at += n
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(dtype: torch.dtype, a: argparse.Namespace, blocks: list[int]) -> dict:
    width = sum(blocks)
    q = torch.randn(1, a.heads, width, a.head_dim, dtype=dtype)
    k = torch.randn(1, a.heads, a.past + width, a.head_dim, dtype=dtype)
    v = torch.randn(1, a.heads, a.past + width, a.head_dim, dtype=dtype)
    mask = block_mask(a.past, blocks, dtype)
    diff = (masked(q, k, v, mask).float() - in_parts(q, k, v, a.past, blocks).float()).abs()
    row = {
        "dtype": str(dtype).replace("torch.", ""),
        "masked_ms": median_ms(lambda: masked(q, k, v, mask), a.repeats),
        "in_parts_ms": median_ms(lambda: in_parts(q, k, v, a.past, blocks), a.repeats),
        "max_abs_diff": float(diff.max()),
    }
    row["speedup"] = row["masked_ms"] / row["in_parts_ms"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--past", type=int, default=450, help="cached prompt tokens")
    p.add_argument("--blocks", default="70,90,80,85,75,95", help="question lengths in the row")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out")
    a = p.parse_args()
    blocks = [int(x) for x in a.blocks.split(",")]
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows.append(measure(dtype, a, blocks))
        print(json.dumps(rows[-1]))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        config = {"past": a.past, "blocks": blocks, "heads": a.heads, "head_dim": a.head_dim}
        Path(a.out).write_text(json.dumps({"config": config, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
