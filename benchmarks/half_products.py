"""How fast this CPU multiplies a replay's ``A @ V`` in each precision (why
``kernels.product_dtype`` probes instead of assuming).

Per length L: SmolLM2's shape (9 query heads in 3 KV groups, head size 64), maps stored as fp16,
values fp32. Variants: the fp16 product as stored (no copy of the maps), converting the maps to fp32
first, all fp32, and bf16. Mean microseconds over repeated calls after a warm-up.

    python benchmarks/half_products.py --out runs/exp/half_products.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attncache.bench import machine
from attncache.runtime.kernels import product_dtype


def micros(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e6 * (time.perf_counter() - t0) / repeats


def timed(length: int, repeats: int) -> dict:
    maps = torch.softmax(torch.randn(9, length, length), -1).half()
    stacked, v = maps.view(3, 3 * length, length), torch.randn(3, length, 64)
    as32, as16 = stacked.float(), stacked.bfloat16()
    row = {
        "tokens": length,
        "fp16_us": micros(lambda: torch.bmm(stacked, v.half()).float(), repeats),
        "convert_fp32_us": micros(lambda: torch.bmm(stacked.float(), v), repeats),
        "fp32_us": micros(lambda: torch.bmm(as32, v), repeats),
        "bf16_us": micros(lambda: torch.bmm(as16, v.bfloat16()).float(), repeats),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="64,128,256,512")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = [timed(int(x), a.repeats) for x in a.lengths.split(",")]
    chosen = str(product_dtype(torch.float16, torch.float32, "cpu"))
    res = {"rows": rows, "product_dtype": chosen, "machine": machine()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
