"""Store at scale (issue 6): open time, lookup p50/p99 and fetch bandwidth vs entries; LRU vs LFU
hit rate.

Synthetic maps (rows are random causal distributions) in a DB shaped like SmolLM2's stored policy
layers: 5 layers x 9 heads, 576-dim features, 64-token inputs, int8 (or --codec) maps. Entries are
added with the real insert path in chunks; after each chunk the DB is reopened and measured.

    python benchmarks/store_scale.py --sizes 1000,2000,5000,10000 --out runs/exp/store_scale.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attncache import AttnCache, BuildConfig
from attncache.bench import machine


class _Tok:
    """Only fingerprinted by the cache."""

    pad_token_id = 0
    all_special_tokens = ["<pad>"]

    def get_vocab(self):
        return {f"t{i}": i for i in range(512)}


def tiny_db(
    folder: Path, codec: str, layers: int = 5, heads: int = 9
) -> tuple[AttnCache, LlamaForCausalLM]:
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=heads * 64,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=3 if heads % 3 == 0 else heads,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 512, size=64).tolist() for _ in range(4)]
    return AttnCache.build(
        model, _Tok(), seqs, folder, BuildConfig(codec=codec), progress=False
    ), model


def synthetic(n: int, nl: int, H: int, L: int, F: int, rng) -> tuple[list[np.ndarray], np.ndarray]:
    x = np.tril(np.exp(3 * rng.standard_normal((n, nl, H, L, L)).astype(np.float32)))
    return list(x / x.sum(-1, keepdims=True)), rng.normal(size=(n, F)).astype(np.float32)


def memcpy_gbps(mb: int = 256) -> float:
    a = np.ones(mb << 18, np.float32)
    b = np.empty_like(a)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t)
    return a.nbytes / np.median(ts) / 1e9


def scale(args) -> dict:
    rng = np.random.default_rng(1)
    root = Path(tempfile.mkdtemp(prefix="attncache-scale-"))
    try:
        cache, _ = tiny_db(root / "db", args.codec)
        nl, H, F = (
            len(cache.store.layout.layers),
            cache.store.layout.n_heads,
            cache.projector.in_dim,
        )
        # a pool of distinct synthetic entries, reused (the store does not care that maps repeat)
        pool_maps, _ = synthetic(64, nl, H, args.length, F, rng)
        curve = []
        for size in args.sizes:
            while len(cache.store) < size:
                n = min(args.chunk, size - len(cache.store))
                feats = rng.normal(size=(n, F)).astype(np.float32)
                cache.insert([pool_maps[i % 64] for i in range(n)], feats)
            t = time.perf_counter()
            c = AttnCache.open(root / "db")
            open_s = time.perf_counter() - t
            q = rng.normal(size=(args.queries, F)).astype(np.float32)
            lat = []
            for i in range(args.queries):
                t = time.perf_counter()
                c.lookup(q[i : i + 1], [args.length], threshold=float("inf"))
                lat.append(time.perf_counter() - t)
            ents = rng.integers(0, len(c.store), size=args.fetches)
            t = time.perf_counter()
            nbytes = 0
            for e in ents:
                for layer in c.store.layout.layers:
                    m = c.fetch(int(e), layer, args.length)
                    nbytes += m.numel() * m.element_size()
            fetch_s = time.perf_counter() - t
            stored = int(c.store.table.nbytes[ents].sum())
            curve.append(
                {
                    "entries": len(c.store),
                    "map_bytes": c.store.nbytes,
                    "open_s": open_s,
                    "lookup_ms_p50": 1e3 * float(np.percentile(lat, 50)),
                    "lookup_ms_p99": 1e3 * float(np.percentile(lat, 99)),
                    "fetch_ms_per_entry": 1e3 * fetch_s / args.fetches,
                    "fetch_decoded_gbps": nbytes / fetch_s / 1e9,
                    "fetch_stored_gbps": stored / fetch_s / 1e9,
                }
            )
            print(json.dumps(curve[-1]), flush=True)
        return {
            "codec": args.codec,
            "length": args.length,
            "stored_layers": nl,
            "heads": H,
            "curve": curve,
            "memcpy_gbps": memcpy_gbps(),
            "machine": machine(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def eviction(args) -> dict:
    """A Zipf stream over distinct inputs; misses are inserted under a cap of --cap-entries
    entries."""
    out = {}
    for policy in ("lru", "lfu"):
        rng = np.random.default_rng(2)
        root = Path(tempfile.mkdtemp(prefix="attncache-evict-"))
        try:
            cache, _ = tiny_db(root / "db", "int8", layers=1, heads=2)
            F, L = cache.projector.in_dim, 8
            items = (
                rng.normal(size=(args.distinct, F)).astype(np.float32) * 10
            )  # far apart: no false hits
            maps, _ = synthetic(1, 1, 2, L, F, rng)
            per = len(cache.store) and int(cache.store.table.nbytes[0])
            cache.evict_to(per * 1)  # start (almost) empty
            probe = np.random.default_rng(3)
            ranks = probe.zipf(args.zipf, size=args.stream * 3)
            stream = ranks[ranks <= args.distinct][: args.stream] - 1
            c = AttnCache.open(root / "db", max_bytes=None, eviction=policy)
            hits = 0
            for k, i in enumerate(stream):
                h = c.lookup(items[i : i + 1], [L], threshold=1e-3)[0]
                if h is not None:
                    hits += 1
                else:
                    c.insert(maps, items[i : i + 1])
                    if k == 0:
                        per = int(c.store.table.nbytes[-1])
                        c.evict_to(per * args.cap_entries)
            out[policy] = {"hit_rate": hits / len(stream), "entries": len(c.store)}
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "stream": args.stream,
        "distinct": args.distinct,
        "zipf_a": args.zipf,
        "cap_entries": args.cap_entries,
        **out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,2000,5000,10000")
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--fetches", type=int, default=100)
    ap.add_argument("--stream", type=int, default=3000)
    ap.add_argument("--distinct", type=int, default=1000)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--cap-entries", type=int, default=100)
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    res = {"eviction": eviction(args)}
    print(json.dumps(res["eviction"]), flush=True)
    if not args.skip_scale:
        res["scale"] = scale(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
