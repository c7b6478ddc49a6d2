"""Peak memory of making a cheap copy (``tasks.precisions.cheap_copy``) beside the loaded model.

Per precision, in a fresh process: the model's parameter bytes, the copy's, and how far the
process's peak RSS (``ru_maxrss``) rose while copying. A copy that duplicated every weight in
float32 before casting would rise by about the model's size; one cast while copying, by its own.

    python benchmarks/cheap_copy_memory.py --out runs/exp/cheap_copy_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path

MIB = 2**20


def measure(model_name: str, precision: str) -> dict:
    from attncache import models
    from attncache.tasks.precisions import cheap_copy, cheap_precision

    model, _ = models.load(model_name)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    copy = cheap_copy(model, cheap_precision(precision))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "precision": precision,
        "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MIB,
        "copy_mib": sum(p.numel() * p.element_size() for p in copy.parameters()) / MIB,
        "peak_rise_mib": (after - before) / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16,bfloat16-linears")
    ap.add_argument("--out", required=True)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's precision
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.model, a.one)))
        return
    rows = []
    for precision in a.dtype.split(","):  # a fresh process each: ru_maxrss only grows
        cmd = [sys.executable, __file__, "--model", a.model, "--out", a.out, "--one", precision]
        got = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(got.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
