"""Side by side with what a user would pick instead, on the same token ids (issue 13, item 7).

Engines (each skipped with a note when its package is missing; install with ``pip install
ctranslate2`` / ``pip install xllamacpp``, not project dependencies):

- ``hf``: plain transformers fp32 SDPA at its best batch size (the baseline);
- ``lmeval-hf``: lm-evaluation-harness's HF backend (``HFLM``, what ``lm-eval --model hf`` runs)
  at its best ``batch_size``, fed the same (context, continuation) token ids through its
  ``_loglikelihood_tokens``, so its own batching and one-token-continuation grouping apply;
- ``attncache``: the exact tiers (memo off, prefix tier on) at their best batch size;
- ``attncache-verified``: the cheap pass verified by margin (bfloat16 tiers, rows under the gate's
  threshold rerun in float32 through float32 tiers), its gate calibrated on ``--calibrate`` rows
  (disjoint from ``--data``; not timed), fallback share beside its time;
- ``ct2-float32`` / ``ct2-int8``: CTranslate2, next-token logits from ``generate_batch``
  (``return_logits_vocab``) for single-token choices, ``score_batch`` for continuations;
- ``ct2-static``: float32 and int8 with ``static_prompt`` = the prefix each group of rows shares
  (CTranslate2's own prefix reuse), batch 1 as its API requires;
- ``llamacpp``: llama.cpp (the ``xllamacpp`` wheel) on the built-in Q4_1 GGUF, its prompt cache on
  (each slot keeps the K/V of its last prompt), one request per row from as many threads as slots;
  single-token choices only (the server returns no log-probs of prompt tokens), scored from the
  top ``--llamacpp-top`` next-token log-probs (a choice outside them counts as -inf).

Reported per engine: seconds per pass (median of ``--repeats``, best batch size or slot count) and
agreement of its answers with HF fp32. Every pass starts empty, as attncache's do: llama.cpp gets a
fresh server and CTranslate2's static prompts a fresh generator per pass (each keeps state between
calls). ``--engines ct2-static,llamacpp-on`` reruns only those two (llama.cpp with its cache on).

    python benchmarks/peers.py --data "mmlu:5shot[0:30]" --calibrate "mmlu:5shot[100:400]" \\
        --out runs/exp/peers_mmlu5.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from attncache import models
from attncache.bench import machine
from attncache.tasks import Plan, RunOptions, Tiers, predictions, run
from attncache.tasks.precisions import cheap_copy
from attncache.tasks.verify import Precision, calibrate_gate, run_verified
from attncache.tiers import PrefixTier
from attncache.tiers.schedule import prefix_groups, shared_prefix
from attncache.workflows import Session


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


ENGINES = [
    "hf",
    "lmeval-hf",
    "attncache",
    "attncache-verified",
    "ct2-float32",
    "ct2-int8",
    "ct2-static",
    "llamacpp",
]
MIN_STATIC = 16  # tokens a group of rows must share to get a static prompt


def ct2_predictions(plan: Plan, tok, generator, batch: int, static: list[str] | None) -> list[int]:
    """Choice rows scored from CTranslate2's next-token logits (single-token choices) or
    per-token log-probs (continuations), in the same way ``tasks`` scores them."""
    preds = []
    for start in range(0, len(plan.rows), batch):
        rows = plan.rows[start : start + batch]
        single = all(r.kind == "choice1" for r in rows)
        if single:
            seqs = [tok.convert_ids_to_tokens(context(plan, r.queries[0][0])) for r in rows]
            if static is not None:
                seqs = [s[len(static) :] for s in seqs]
            res = generator.generate_batch(
                seqs,
                max_length=1,
                include_prompt_in_result=False,
                return_logits_vocab=True,
                beam_size=1,
                **({"static_prompt": static} if static is not None else {}),
            )
            for r, x in zip(rows, res, strict=True):
                logits = np.asarray(x.logits[0]).reshape(-1)
                lp = logits - np.logaddexp.reduce(logits)
                preds.append(int(np.argmax([lp[qs[0].token] for qs in r.queries])))
        else:
            ids = sorted({q for r in rows for q in r.seqs})
            scored = generator.score_batch([tok.convert_ids_to_tokens(plan.seqs[q]) for q in ids])
            lp = {q: s.log_probs for q, s in zip(ids, scored, strict=True)}
            for r in rows:
                sc = []
                for qs, norm in zip(r.queries, r.norms, strict=True):
                    total = 0.0
                    for q in qs:  # log p of the token at position len - from_end + 1
                        total += lp[q.seq][len(plan.seqs[q.seq]) - q.from_end]
                    sc.append(total / norm)
                preds.append(int(np.argmax(sc)))
    return preds


def ct2_static(plan: Plan, tok, generator) -> list[int]:
    """Rows grouped by the prefix their sequences share; a group's prefix is its static prompt."""
    preds: dict[int, int] = {}
    firsts = [context(plan, r.queries[0][0]) for r in plan.rows]
    for members in prefix_groups(firsts, MIN_STATIC):
        n = shared_prefix(firsts, members) if len(members) > 1 else 0
        static = tok.convert_ids_to_tokens(firsts[members[0]][:n]) if n else None
        sub = plan.subset(members)
        got = ct2_predictions(sub, tok, generator, 1, static)
        preds.update(zip(members, got, strict=True))
    return [preds[i] for i in range(len(plan.rows))]


def context(plan: Plan, q) -> list[int]:
    """The tokens a query's logits follow (the planner may read a choice's first token from
    another sequence with the same tokens so far)."""
    seq = plan.seqs[q.seq]
    return list(seq[: len(seq) - q.from_end + 1])


def lm_eval_requests(plan: Plan) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """One (context, continuation) request per choice of every choice row, in plan order."""
    return [
        (("", ""), context(plan, qs[0]), [q.token for q in qs])
        for r in plan.rows
        for qs in r.queries
    ]


def lm_eval_predictions(plan: Plan, lm, batch: int) -> list[int]:
    lm.batch_size_per_gpu = batch
    got = iter(lm._loglikelihood_tokens(lm_eval_requests(plan), disable_tqdm=True))
    preds = []
    for r in plan.rows:
        scores = [next(got)[0] / norm for norm in r.norms]
        preds.append(int(np.argmax(scores)))
    return preds


def verified_row(s: Session, plan: Plan, a, sizes: list[int], exact: list[int]) -> dict:
    cheap_model = cheap_copy(s.model, torch.bfloat16)

    def tiers(model) -> Tiers:  # a fresh prefix tree per pass, one per precision
        return Tiers(prefix=PrefixTier(model))

    calib = s.plan(a.calibrate, quiet=True)
    opts = RunOptions(batch_size=8, progress=False)
    gate = calibrate_gate(
        calib,
        run(cheap_model, s.tokenizer, calib, opts, tiers(cheap_model)),
        run(s.model, s.tokenizer, calib, opts, tiers(s.model)),
        a.max_loss,
    )

    def verified(b: int):
        cheap, exact_tiers = (
            Precision(cheap_model, tiers(cheap_model)),
            Precision(s.model, tiers(s.model)),
        )
        opts = RunOptions(batch_size=b, progress=False)
        return run_verified(s.tokenizer, plan, cheap, exact_tiers, gate.threshold, opts)

    got = {b: timed(lambda b=b: verified(b), a.repeats) for b in sizes}
    b = min(got, key=lambda x: got[x][0])
    secs, v = got[b]
    return {
        "engine": "attncache cheap pass (bf16) verified by margin",
        "batch_size": b,
        "seconds": secs,
        "agreement": float(np.mean(np.array(predictions(plan, v.out)) == np.array(exact))),
        "fallback_share": v.fallback_share,
        "gate": gate.as_dict(),
    }


def llamacpp_rows(plan: Plan, a, exact: list[int], sizes: list[int]) -> list[dict]:
    try:
        import xllamacpp
    except ImportError:
        return [{"engine": "llama.cpp", "skipped": "pip install xllamacpp"}]
    if not all(r.kind == "choice1" for r in plan.rows):
        return [{"engine": "llama.cpp", "skipped": "continuations need prompt log-probs"}]
    folder, gguf = models.resolve(a.model)
    if gguf is None:
        return [{"engine": "llama.cpp", "skipped": "the model is not a GGUF"}]
    out = []
    for cache in (True, False) if "llamacpp" in a.engines.split(",") else (True,):
        best = None
        for slots in sorted({1, max(sizes)}):
            p = xllamacpp.CommonParams()
            p.model.path = str(Path(folder) / gguf)
            p.n_parallel, p.n_ctx = slots, 4096 * slots
            p.cpuparams.n_threads = p.cpuparams_batch.n_threads = torch.get_num_threads()
            p.cache_prompt, p.warmup, p.verbosity = cache, False, -1

            def one(r, server, cache=cache):
                res = server.handle_completions(
                    {
                        "prompt": context(plan, r.queries[0][0]),
                        "n_predict": 1,
                        "n_probs": a.llamacpp_top,
                        "temperature": 0.0,
                        "cache_prompt": cache,
                    }
                )
                top = res["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                lp = {t["id"]: t["logprob"] for t in top}
                return int(np.argmax([lp.get(qs[0].token, -np.inf) for qs in r.queries]))

            # a fresh server per pass (started outside the timer): a server kept between passes
            # would answer every later pass from the prompts the previous one left in its slots,
            # while the other engines start each pass empty
            times, got = [], None
            for _ in range(a.repeats):
                server = xllamacpp.Server(p)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(slots) as pool:
                    got = list(pool.map(lambda r, server=server: one(r, server), plan.rows))
                times.append(time.perf_counter() - t0)
                del server
            secs = statistics.median(times)
            if best is None or secs < best[0]:
                best = (secs, slots, got)
        secs, slots, got = best
        out.append(
            {
                "engine": f"llama.cpp Q4_1, prompt cache {'on' if cache else 'off'}",
                "batch_size": slots,
                "seconds": secs,
                "agreement": float(np.mean(np.array(got) == np.array(exact))),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--calibrate", default=None, help="rows that calibrate the verified pass")
    ap.add_argument("--max-loss", type=float, default=0.02)
    ap.add_argument("--llamacpp-top", type=int, default=200)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    s = Session.open(None, a.model)
    plan, tok, model = s.plan(a.data, quiet=True), s.tokenizer, s.model
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    engines = a.engines.split(",")
    rows: list[dict] = []

    def best_of(fn_of_batch) -> tuple[float, int, list[int]]:
        got = {b: timed(lambda b=b: fn_of_batch(b), a.repeats) for b in sizes}
        b = min(got, key=lambda x: got[x][0])
        return got[b][0], b, got[b][1]

    secs, b, exact = best_of(
        lambda b: predictions(plan, run(model, tok, plan, RunOptions(batch_size=b, progress=False)))
    )
    rows.append({"engine": "hf fp32 sdpa", "batch_size": b, "seconds": secs, "agreement": 1.0})
    if "lmeval-hf" in engines:
        if not all(r.kind in ("choice1", "choiceN") for r in plan.rows):
            rows.append({"engine": "lm-eval hf", "skipped": "choice rows only"})
        else:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
            secs, b, got = best_of(lambda b: lm_eval_predictions(plan, lm, b))
            rows.append(
                {
                    "engine": "lm-eval 0.4.13 hf backend",
                    "batch_size": b,
                    "seconds": secs,
                    "agreement": float(np.mean(np.array(got) == np.array(exact))),
                }
            )
    if "attncache" in engines:
        secs, b, got = best_of(
            lambda b: predictions(
                plan,
                run(
                    model,
                    tok,
                    plan,
                    RunOptions(batch_size=b, progress=False),
                    tiers=Tiers(prefix=s.prefix_tier(2 << 30)),
                ),
            )
        )
        rows.append(
            {
                "engine": "attncache exact tiers",
                "batch_size": b,
                "seconds": secs,
                "agreement": float(np.mean(np.array(got) == np.array(exact))),
            }
        )
    if "attncache-verified" in engines and a.calibrate:
        rows.append(verified_row(s, plan, a, sizes, exact))
    try:
        import ctranslate2
    except ImportError:
        ctranslate2 = None
        rows.append({"engine": "ctranslate2", "skipped": "pip install ctranslate2"})
    if ctranslate2 is not None:
        folder = models.hf_folder(a.model)
        for quant in ("float32", "int8"):
            if not any(e.startswith("ct2") for e in engines):
                break
            out = models.cache_home() / "ct2" / f"{Path(folder).name}-{quant}"
            if not (out / "model.bin").exists():
                ctranslate2.converters.TransformersConverter(str(folder)).convert(
                    str(out), quantization=quant, force=True
                )
            gen = ctranslate2.Generator(
                str(out), device="cpu", intra_threads=torch.get_num_threads()
            )
            if f"ct2-{quant}" in engines:
                secs, b, got = best_of(lambda b, gen=gen: ct2_predictions(plan, tok, gen, b, None))
                rows.append(
                    {
                        "engine": f"ctranslate2 {quant}",
                        "batch_size": b,
                        "seconds": secs,
                        "agreement": float(np.mean(np.array(got) == np.array(exact))),
                    }
                )
            if "ct2-static" in engines:
                # a fresh generator per pass (loaded outside the timer): CTranslate2 keeps each
                # static prompt's state between calls, so a kept one would start later passes warm
                times = []
                for _ in range(a.repeats):
                    fresh = ctranslate2.Generator(
                        str(out), device="cpu", intra_threads=torch.get_num_threads()
                    )
                    t0 = time.perf_counter()
                    got = ct2_static(plan, tok, fresh)
                    times.append(time.perf_counter() - t0)
                    del fresh
                secs = statistics.median(times)
                rows.append(
                    {
                        "engine": f"ctranslate2 {quant} static_prompt",
                        "batch_size": 1,
                        "seconds": secs,
                        "agreement": float(np.mean(np.array(got) == np.array(exact))),
                    }
                )
    if "llamacpp" in engines or "llamacpp-on" in engines:  # -on: its prompt cache on only
        rows += llamacpp_rows(plan, a, exact, sizes)
    res = {
        "data": a.data,
        "rows": len(plan.rows),
        "tokens": sum(map(len, plan.seqs)),
        "engines": rows,
        "machine": machine(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
