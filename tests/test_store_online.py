"""Online insertion, the byte cap, eviction order, reclaimed disk, learning from misses,
migration."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import synthetic
from tiny import TinyTokenizer, random_seqs, tiny_model

from attncache import AttnCache, BuildConfig, UserError
from attncache.db.files import MANIFEST
from attncache.db.segments import (
    EntryTable,
    MapStore,
    StoreLayout,
    encode_entry,
    seg_name,
    write_segment,
)
from attncache.inputs import collate


def segment_bytes(db) -> int:
    return sum(p.stat().st_size for p in db.glob("seg-*.bin"))


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "db"
    AttnCache.build(
        tiny_model("llama"),
        TinyTokenizer(),
        random_seqs(6, lo=7, hi=7, seed=4),
        path,
        BuildConfig(codec="float16"),
        progress=False,
    )
    return path


def test_insert_is_visible_to_the_next_lookup_and_to_other_processes(db):
    cache = AttnCache.open(db)
    maps, feats = synthetic(cache, 3, seed=1)
    uids = cache.insert(maps, feats)
    assert uids == [6, 7, 8] and len(cache.store) == 9
    hits = cache.lookup(feats, [7, 7, 7], threshold=1e-4)
    assert [h.entry for h in hits] == [6, 7, 8]
    got = cache.fetch(7, 0, 7).float().numpy()
    assert np.abs(got - maps[1][0]).max() < 1e-3
    other = AttnCache.open(db)  # a fresh reader sees the committed entries
    assert len(other.store) == 9 and [
        h.entry for h in other.lookup(feats, [7] * 3, threshold=1e-4)
    ] == [6, 7, 8]
    assert AttnCache.verify(db) == []


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_cap_is_never_exceeded_and_eviction_follows_the_policy(db, eviction):
    cache = AttnCache.open(db)
    per = int(cache.store.table.nbytes[0])  # all entries have 7 tokens: one size
    cap = 8 * per
    assert cache.evict_to(cap) == 0
    cache = AttnCache.open(db, max_bytes=cap, eviction=eviction)
    feats0 = np.load(db / json.loads((db / MANIFEST).read_text())["names"]["features"])
    # uid 0 is used often early on (LFU keeps it, LRU lets it go); uid 1 is used before every insert
    # (both keep it)
    for _ in range(8):
        cache.lookup(feats0[:1], [7], threshold=1e-4)
    for k in range(5):
        cache.lookup(feats0[1:2], [7], threshold=1e-4)
        maps, feats = synthetic(cache, 2, seed=10 + k)
        cache.insert(maps, feats)
        assert (
            cache.store.nbytes <= cap and segment_bytes(db) <= cap
        )  # committed, and really on disk
        assert segment_bytes(db) == cache.store.live_bytes  # evicted bytes are reclaimed
    uids = set(cache.store.table.uid.tolist())
    assert len(uids) == 8 and cache.info().evictions == 6 + 10 - 8
    assert 1 in uids and 2 not in uids  # used before every insert / never used
    assert (0 in uids) == (eviction == "lfu")
    assert AttnCache.verify(db) == []
    assert len(AttnCache.open(db).store) == 8


def test_a_cap_below_one_entry_stores_nothing_and_says_so(db):
    cache = AttnCache.open(db, max_bytes=10)
    maps, feats = synthetic(cache, 1, seed=2)
    assert cache.insert(maps, feats) == []
    with pytest.raises(UserError, match="must be positive"):
        AttnCache.open(db, max_bytes=0)


def test_build_with_a_cap_stores_what_fits(tmp_path):
    model = tiny_model("llama")
    seqs = random_seqs(10, lo=7, hi=7, seed=5)
    full = AttnCache.build(model, TinyTokenizer(), seqs, tmp_path / "full", progress=False)
    per = int(full.store.table.nbytes[0])
    capped = AttnCache.build(
        model,
        TinyTokenizer(),
        seqs,
        tmp_path / "cap",
        BuildConfig(max_bytes=4 * per),
        progress=False,
    )
    assert len(capped.store) == 4 and capped.manifest["build_dropped_by_cap"] == 6
    assert segment_bytes(tmp_path / "cap") <= 4 * per


def test_learn_inserts_misses_and_they_hit_next_time(db):
    model = tiny_model("llama")
    cache = AttnCache.open(db)
    new = random_seqs(3, lo=9, hi=9, seed=77)
    batch = collate(new, 0, True)
    with cache.attach(model, "all", learn=True) as att, torch.no_grad():
        model(**batch)
        assert att.last_hits == [None, None, None]  # 9-token inputs: no compatible entry yet
        assert att.learn_pending() == 3
        out = model(**batch, logits_to_keep=1).logits
        assert all(h is not None and h.distance < 1e-4 for h in att.last_hits)
    ref = model(**batch, logits_to_keep=1).logits
    assert torch.allclose(out, ref, atol=1e-2)  # its own maps (fp16): the exact answer
    assert len(AttnCache.open(db).store) == 9


def test_learn_stores_an_input_seen_twice_once(db):
    """Misses repeated in one batch (or across batches before a flush) are recorded once: the
    DB grows by the distinct inputs, never by copies that would crowd its byte cap."""
    model = tiny_model("llama")
    cache = AttnCache.open(db)
    a, b = random_seqs(2, lo=9, hi=9, seed=78)
    with cache.attach(model, "all", learn=True) as att, torch.no_grad():
        model(**collate([a, b, a], 0, True))
        model(**collate([b], 0, True))
        assert att.learn_pending() == 2
    assert len(AttnCache.open(db).store) == 8


def test_retrain_reindexes_the_grown_store(db):
    cache = AttnCache.open(db)
    maps, feats = synthetic(cache, 4, seed=5)
    cache.insert(maps, feats)
    res = cache.retrain(progress=False)
    assert res["entries"] == 10
    again = AttnCache.open(db)
    assert again.vectors.shape[0] == 10 and AttnCache.verify(db) == []
    assert [h.entry for h in again.lookup(feats, [7] * 4, threshold=1e-4)] == [6, 7, 8, 9]


def test_default_codec_is_float16_and_int8_is_one_option_away(tmp_path):
    """'auto' picks float16 for every family (read zero-copy: a hit never slower than its miss);
    int8 stays available and keeps a causal map in under 1/8 of its fp32 bytes."""
    seqs = random_seqs(4, seed=3)
    dec = AttnCache.build(
        tiny_model("llama"), TinyTokenizer(), seqs, tmp_path / "d", progress=False
    )
    enc = AttnCache.build(tiny_model("bert"), TinyTokenizer(), seqs, tmp_path / "e", progress=False)
    assert dec.store.layout.codec == "float16" and enc.store.layout.codec == "float16"
    small = AttnCache.build(
        tiny_model("llama"),
        TinyTokenizer(),
        seqs,
        tmp_path / "i",
        BuildConfig(codec="int8"),
        progress=False,
    )
    assert small.store.layout.codec == "int8" and small.info().map_bytes_vs_fp32 < 1 / 8


def test_store_only_the_policy_layers(tmp_path):
    model = tiny_model("llama")
    seqs = random_seqs(12, lo=6, hi=9, seed=8)
    auto = AttnCache.build(
        model,
        TinyTokenizer(),
        seqs,
        tmp_path / "auto",
        BuildConfig(store_layers="auto"),
        progress=False,
    )
    full = AttnCache.build(model, TinyTokenizer(), seqs, tmp_path / "full", progress=False)
    layers = auto.store.layout.layers
    assert auto.default_layers == layers and len(layers) < model.config.num_hidden_layers
    assert (
        auto.store.nbytes < full.store.nbytes * (len(layers) + 0.5) / model.config.num_hidden_layers
    )
    batch = collate(seqs[:2], 0, True)
    with auto.attach(model, "all") as att, torch.no_grad():
        model(**batch)
        assert att.stats.layer_maps_reused == 2 * len(layers)  # only stored layers can be reused


def test_migrate_from_format_1(db):
    """A format-1 DB (one maps.bin, fixed file names) opens after 'migrate' with the same maps."""
    cache = AttnCache.open(db)
    m = json.loads((db / MANIFEST).read_text())
    st_ = cache.store
    raw = b"".join(
        np.stack([st_.layer(e, layer).float().numpy() for layer in st_.layout.layers])
        .astype(np.float16)
        .tobytes()
        for e in range(len(st_))
    )
    lengths = st_.lengths.tolist()
    per = [len(st_.layout.layers) * st_.layout.n_heads * L * L * 2 for L in lengths]
    offsets = np.concatenate([[0], np.cumsum(per)[:-1]]).tolist()
    for p in db.iterdir():
        if p.name not in (".lock",):
            p.rename(db / ("old-" + p.name))
    (db / "maps.bin").write_bytes(raw)
    for k in ("features", "vectors", "projector"):
        ext = "safetensors" if k == "projector" else "npy"
        (db / f"old-{m['names'][k]}").rename(db / f"{k}.{ext}")
    v1 = {k: m[k] for k in ("model", "projector", "threshold", "policy", "allow_crop")}
    v1.update(
        format_version=1,
        entries={"lengths": lengths, "offsets": offsets},
        store={"n_heads": st_.layout.n_heads, "layers": st_.layout.layers, "dtype": "float16"},
    )
    (db / MANIFEST).write_text(json.dumps(v1))
    for p in db.glob("old-*"):
        p.unlink()
    assert AttnCache.migrate(db) is True and AttnCache.migrate(db) is False
    again = AttnCache.open(db)
    assert len(again.store) == len(st_) and AttnCache.verify(db) == []
    assert np.array_equal(
        again.fetch(2, 1, lengths[2]).numpy(), cache.fetch(2, 1, lengths[2]).numpy()
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    codec=st.sampled_from(["float32", "float16", "int8", "sparse"]),
    causal=st.booleans(),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    heads=st.integers(1, 3),
    seed=st.integers(0, 99),
)
def test_store_round_trip_property(tmp_path_factory, codec, causal, lengths, heads, seed):
    """Any shapes, any codec: every entry reads back as rows that sum to 1, close to what was
    written, and its crc32 checks."""
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("prop")
    layout = StoreLayout(n_heads=heads, layers=[0, 2], codec=codec, causal=causal)
    entries = []
    for L in lengths:
        x = rng.random((2, heads, L, L)).astype(np.float32) ** 4 + 1e-4
        x = np.tril(x) if causal else x
        entries.append(x / x.sum(-1, keepdims=True))
    blobs = [encode_entry(layout, e) for e in entries]
    written = write_segment(folder, 3, blobs)
    n = len(blobs)
    table = EntryTable(
        np.arange(n),
        np.full(n, 3),
        np.asarray(written.offsets),
        np.asarray([len(b) for b in blobs]),
        np.asarray(lengths),
        np.asarray(written.crcs),
        np.zeros(n, np.int64),
        np.zeros(n),
    )
    store = MapStore(folder, layout, table, {seg_name(3): sum(map(len, blobs))})
    tol = {"float32": 1e-6, "float16": 2e-3, "int8": 0.05, "sparse": 0.06}[codec]
    for i, e in enumerate(entries):
        assert store.check(i)
        for pos, layer in enumerate(layout.layers):
            got = store.layer(i, layer).float().numpy()
            assert np.abs(got.sum(-1) - 1).max() < 2e-2
            assert (0.5 * np.abs(got - e[pos]).sum(-1)).max() <= tol


def test_prefetch_gives_the_same_outputs(tmp_path):
    """The background prefetch of a compact store hands replay exactly the maps a direct fetch
    would."""
    model = tiny_model("llama")
    seqs = random_seqs(6, lo=8, hi=12, seed=12)
    cache = AttnCache.build(
        model, TinyTokenizer(), seqs, tmp_path / "db", BuildConfig(codec="int8"), progress=False
    )
    batch = collate(seqs[:4], 0, True)
    outs = []
    for prefetch in (False, True):
        with cache.attach(model, "all", threshold=1e9, prefetch=prefetch) as att, torch.no_grad():
            outs.append(model(**batch, logits_to_keep=1).logits)
            assert all(h is not None for h in att.last_hits)
            assert att.maps.pending == 0  # every prefetched map was consumed
    assert torch.equal(outs[0], outs[1])


def test_compress_keeps_entries_and_hits(db, tmp_path):
    cache = AttnCache.open(db)
    small = cache.compress(tmp_path / "int8", "int8", progress=False)
    assert (
        small.store.nbytes < cache.store.nbytes / 1.9 and AttnCache.verify(tmp_path / "int8") == []
    )
    assert small.threshold == cache.threshold and np.array_equal(small.vectors, cache.vectors)
    L = int(cache.store.lengths[3])
    a, b = cache.fetch(3, 1, L).float(), small.fetch(3, 1, L).float()
    assert (0.5 * (a - b).abs().sum(-1)).max() < 0.03
    with pytest.raises(UserError, match="already exists"):
        cache.compress(tmp_path / "int8", "int8", progress=False)
