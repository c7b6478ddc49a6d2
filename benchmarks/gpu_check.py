"""GPU check (issue: honest benchmarks, experiment 6): map reuse vs SDPA on a CUDA device, bf16.

The device machine has no registry access and a 64 MiB carry limit, so the real SmolLM2 weights (93
MB GGUF) cannot travel. Timing does not depend on weight values, so this runs a SmolLM2-*shaped*
model (the real config: 30 layers, 9 query / 3 KV heads, head_dim 64) with seeded random weights, on
random token ids. Accuracy in bf16 on the GPU is therefore not measured here (see docs/results.md).

Per length: two inputs are recorded into a cache (fp16 maps on disk) and timed in interleaved order:
sdpa (untouched), eager, cached (lookup + memmap fetch + host->device copy + replay), bound (maps
already resident on the GPU, no lookup). Medians over repeats, CUDA-synchronised.

    python benchmarks/gpu_check.py --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from attncache import AttnCache, BuildConfig  # noqa: E402
from attncache.bench import AttentionTimer, interleaved  # noqa: E402
from attncache.runtime import Attachment, MapStats, PreloadedMaps, PresetHits  # noqa: E402

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    SMOLLM2,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
)  # a smoke test of the script (CI)


class StubTokenizer:
    pad_token_id = 0
    all_special_tokens: list[str] = []

    def get_vocab(self):
        return {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="64,128,256,512,1024,2048")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="runs/gpu_check.json")
    ap.add_argument("--shape", choices=["smollm2", "tiny"], default="smollm2")
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    config = SMOLLM2 if a.shape == "smollm2" else TINY
    model = LlamaForCausalLM(LlamaConfig(**config)).to(dev, dtype).eval()
    model.set_attn_implementation("sdpa")
    model.attncache_name = "smollm2-shaped-random"
    results = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "dtype": a.dtype,
        "torch": torch.__version__,
        "weights": "random (SmolLM2 shape)",
        "rows": [],
    }
    g = torch.Generator().manual_seed(1)
    for L in [int(x) for x in a.lengths.split(",")]:
        seqs = [
            torch.randint(1, config["vocab_size"], (L,), generator=g).tolist() for _ in range(2)
        ]
        with tempfile.TemporaryDirectory() as d:
            row = time_length(model, seqs, Path(d) / "db", a.repeats, dev)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))


def time_length(model, seqs: list[list[int]], db: Path, repeats: int, dev: str) -> dict:
    L = len(seqs[0])
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    cache = AttnCache.build(
        model, StubTokenizer(), seqs, db, BuildConfig(batch_size=1, codec="float16"), progress=False
    )
    build_s = time.perf_counter() - t0
    ids = [torch.tensor([s], device=dev) for s in seqs]
    pol = cache.policy("all")
    # the bound variant: every map already resident on the device
    layers = cache.store.layout.layers
    pre = {
        (e, layer, L): cache.fetch(e, layer, L, dev)
        for e in range(len(cache.store))
        for layer in layers
    }
    mods = cache.adapter.attention_modules(model)
    order = []  # which stored entry is which input: look each one up once
    with cache.attach(model, pol) as att, torch.no_grad():
        for x in ids:
            model(input_ids=x, logits_to_keep=1)
            order.append(att.last_hits[0])
    assert all(h is not None for h in order), "inputs must hit their own entries"

    def variant(kind: str):
        def fn(i: int) -> dict:
            model.set_attn_implementation("eager" if kind == "eager" else "sdpa")
            timer = AttentionTimer(mods, sync=dev == "cuda")
            parts = cache.parts(stats=MapStats())
            parts.templates = None
            bound = Attachment(
                model, parts, pol, PresetHits([order[i]]), PreloadedMaps(cache.db, pre)
            )
            ctx = (
                cache.attach(model, pol)
                if kind == "cached"
                else bound
                if kind == "bound"
                else contextlib.nullcontext()
            )
            try:
                with torch.no_grad(), ctx:
                    sync()
                    t = time.perf_counter()
                    model(input_ids=ids[i], logits_to_keep=1)
                    sync()
                    dt = time.perf_counter() - t
            finally:
                timer.remove()
                model.set_attn_implementation("sdpa")
            return {"e2e": dt, "attn": timer.total}

        return fn

    med = interleaved({k: variant(k) for k in ("sdpa", "cached", "bound", "eager")}, 2, repeats, 2)
    tot = {k: {m: sum(v) for m, v in d.items()} for k, d in med.items()}
    return {
        "tokens": L,
        "build_s": build_s,
        "map_mib_per_entry": float(cache.store.table.nbytes.mean()) / 2**20,
        "sdpa_ms": 1000 * tot["sdpa"]["e2e"] / 2,
        "e2e_speedup_vs_sdpa": tot["sdpa"]["e2e"] / tot["cached"]["e2e"],
        "bound_e2e_speedup": tot["sdpa"]["e2e"] / tot["bound"]["e2e"],
        "e2e_speedup_vs_eager": tot["eager"]["e2e"] / tot["cached"]["e2e"],
        "bound_speedup_vs_eager": tot["eager"]["e2e"] / tot["bound"]["e2e"],
        "attn_speedup_vs_sdpa_bound": tot["sdpa"]["attn"] / tot["bound"]["attn"],
        "attn_speedup_vs_eager_bound": tot["eager"]["attn"] / tot["bound"]["attn"],
        "attn_speedup_vs_sdpa_cached": tot["sdpa"]["attn"] / tot["cached"]["attn"],
    }


if __name__ == "__main__":
    main()
