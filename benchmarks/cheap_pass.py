"""The cheap pass verified by margin against plain float32 SDPA at its best batch size.

Per job: the gate is calibrated on CALIBRATE's rows (both precisions over them; every other row
chooses the threshold, the rows between bound it), then DATA (disjoint rows) is timed in these
variants, each at its best batch size, medians of interleaved passes:

- ``sdpa``: the plain float32 model, ``logits_to_keep`` only the needed positions (the baseline);
- ``exact``: attncache's exact tiers in float32;
- ``verified:<precision>``, one per ``--dtype``: the exact tiers in the cheap precision (a prefix
  tree of its own), then the rows whose margin is under that precision's threshold again in
  float32 through the float32 tiers.

Agreement is every row's prediction against ``sdpa``'s; the cheap pass alone (no verification) is
reported too, for what the gate buys. The probe's speedup says whether this device has the cheap
precision natively.

    python benchmarks/cheap_pass.py --calibrate 'sst2[0:300]' --data 'sst2[300:872]'
    python benchmarks/cheap_pass.py --calibrate 'mmlu:5shot[100:400]' --data 'mmlu:5shot[0:100]' \
        --dtype bfloat16,bfloat16-linears
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from attncache.bench.harness import interleaved, machine
from attncache.tasks import RunOptions, Tiers, predictions, run
from attncache.tasks.precisions import cheap_copy, cheap_precision, native_speedup
from attncache.tasks.verify import Precision, calibrate_gate, run_verified
from attncache.tiers import DEFAULT_PREFIX_BYTES, PrefixTier
from attncache.workflows import Session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibrate", required=True, help="rows that calibrate the gate")
    ap.add_argument("--data", required=True, help="rows timed (disjoint from --calibrate)")
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        help="cheap precisions, comma-separated (e.g. bfloat16,bfloat16-linears): each is timed "
        "as its own verified variant in the same interleaved passes",
    )
    ap.add_argument("--batch-sizes", default="4,8,16,32")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--max-loss", type=float, default=0.02)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    s = Session.open(None, args.model)
    precisions = [cheap_precision(d) for d in args.dtype.split(",")]
    cheap_models = {p.name: cheap_copy(s.model, p) for p in precisions}
    tok = s.tokenizer

    prefixes = s.prefix_tier(DEFAULT_PREFIX_BYTES) is not None

    def tiers(model) -> Tiers:  # a fresh prefix tree per pass, one per precision
        return Tiers(prefix=PrefixTier(model) if prefixes else None)

    calib = s.plan(args.calibrate, quiet=True)
    opts = RunOptions(batch_size=8, progress=False)
    exact_calib = run(s.model, tok, calib, opts, tiers(s.model))
    gates = {}
    for name, cheap_model in cheap_models.items():
        cheap_calib = run(cheap_model, tok, calib, opts, tiers(cheap_model))
        gates[name] = calibrate_gate(calib, cheap_calib, exact_calib, args.max_loss)
        print(f"gate {name}: {json.dumps(gates[name].as_dict())}", flush=True)
    plan = s.plan(args.data, quiet=True)
    outs: dict[str, object] = {}

    def variant(name: str, batch: int):
        def fn(_i: int) -> dict:
            o = RunOptions(batch_size=batch, progress=False)
            if name == "sdpa":
                got = run(s.model, tok, plan, o)
            elif name == "exact":
                got = run(s.model, tok, plan, o, tiers(s.model))
            elif name.startswith("cheap:"):
                cheap_model = cheap_models[name.split(":", 1)[1]]
                got = run(cheap_model, tok, plan, o, tiers(cheap_model))
            else:  # "verified:<precision>"
                precision = name.split(":", 1)[1]
                cheap_model = cheap_models[precision]
                cheap = Precision(cheap_model, tiers(cheap_model))
                exact = Precision(s.model, tiers(s.model))
                v = run_verified(tok, plan, cheap, exact, gates[precision].threshold, o)
                outs[f"{name}.fallback"] = v.fallback_share
                got = v.out
            outs[name] = got
            return {"e2e": got.seconds}

        return fn

    best: dict[str, int] = {}
    screening: dict[str, dict[int, float]] = {}
    verified = [f"verified:{p.name}" for p in precisions]
    for name in ("sdpa", "exact", *verified):
        screening[name] = {
            b: interleaved({"x": variant(name, b)}, 1, 1, 0)["x"]["e2e"][0] for b in sizes
        }
        best[name] = min(screening[name], key=screening[name].get)
        print(f"screening {name}: {screening[name]} best b{best[name]}", flush=True)
    timed = interleaved(
        {n: variant(n, b) for n, b in best.items()}, 1, args.passes, 0
    )  # A B C A B C ...
    for p in precisions:  # each unverified cheap pass, for its agreement
        variant(f"cheap:{p.name}", best[f"verified:{p.name}"])(0)
    ref = predictions(plan, outs["sdpa"])

    def agreement(name: str) -> float:
        got = predictions(plan, outs[name])
        return float(np.mean([a == b for a, b in zip(ref, got, strict=True)]))

    base = timed["sdpa"]["e2e"][0]
    result = {
        "model": args.model,
        "data": args.data,
        "calibrate": args.calibrate,
        "rows": len(plan.rows),
        "dtype": args.dtype,
        "probe_speedup": {p.name: native_speedup(p.dtype, "cpu") for p in precisions},
        "gates": {n: g.as_dict() for n, g in gates.items()},
        "best_batch": best,
        "seconds": {n: timed[n]["e2e"][0] for n in best},
        "speedup_vs_best_sdpa": {n: base / timed[n]["e2e"][0] for n in best},
        "agreement": {
            n: agreement(n) for n in ("exact", *verified, *(f"cheap:{p.name}" for p in precisions))
        },
        "fallback_share": {n: outs[f"{n}.fallback"] for n in verified},
        "screening": screening,
        "machine": machine(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
