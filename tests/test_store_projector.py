"""Map store round trips and guards; pair labels; projector training; index."""

import json

import numpy as np
import pytest
import torch

from attncache import UserError
from attncache.build.projector_fit import (
    ProjectorConfig,
    pair_distance,
    pair_labels,
    sample_pairs,
    train,
)
from attncache.db.index import VectorIndex
from attncache.db.manifest import read_manifest
from attncache.db.segments import (
    EntryTable,
    MapStore,
    StoreLayout,
    encode_entry,
    seg_name,
    write_segment,
)
from attncache.runtime.kernels import apply_maps


def rand_maps(nl, h, L, rng, causal=True):
    x = rng.random((nl, h, L, L)).astype(np.float32)
    if causal:
        x = np.tril(x)
    return x / x.sum(-1, keepdims=True)


def write_store(tmp_path, entries, codec="float32", causal=True):
    layout = StoreLayout(
        n_heads=entries[0].shape[1],
        layers=list(range(entries[0].shape[0])),
        codec=codec,
        causal=causal,
    )
    blobs = [encode_entry(layout, e) for e in entries]
    written = write_segment(tmp_path, 0, blobs)
    n = len(blobs)
    table = EntryTable(
        np.arange(n),
        np.zeros(n, np.int64),
        np.asarray(written.offsets),
        np.asarray([len(b) for b in blobs]),
        np.asarray([e.shape[-1] for e in entries]),
        np.asarray(written.crcs),
        np.zeros(n, np.int64),
        np.zeros(n),
    )
    return MapStore(tmp_path, layout, table, {seg_name(0): sum(map(len, blobs))})


@pytest.mark.parametrize(
    "codec,tol", [("float32", 0.0), ("float16", 1e-3), ("int8", 0.03), ("sparse", 0.1)]
)
@pytest.mark.parametrize("causal", [True, False])
def test_store_round_trip(tmp_path, codec, tol, causal):
    """Every codec: decoded maps within its error (row total variation), rows sum to 1, exact causal
    crops."""
    rng = np.random.default_rng(0)
    entries = [rand_maps(2, 3, L, rng, causal) for L in (4, 9, 6, 40)]
    store = write_store(tmp_path, entries, codec, causal)
    for i, e in enumerate(entries):
        for layer in (0, 1):
            got = store.layer(i, layer).float().numpy()
            assert got.shape == e[layer].shape
            assert (0.5 * np.abs(got - e[layer]).sum(-1)).max() <= tol + 1e-6, (codec, i, layer)
            assert np.abs(got.sum(-1) - 1).max() < 2e-2
            if causal:
                assert np.all(np.triu(got, 1) == 0)
                crop = store.layer(i, layer, length=3).float().numpy()
                assert np.array_equal(crop, got[:, :3, :3])
            rows = np.array([0, 2, e.shape[-1] - 1])
            assert np.abs(store.rows(i, rows, 3)[layer] - got[:, rows, :3]).max() < 2e-3
        assert store.check(i)
    if codec == "float16":  # zero-copy: the decoded tensor is a view of the memory map
        assert np.shares_memory(store.layer(0, 0).numpy(), store._mm[0])


def test_sparse_keeps_every_bit_of_mass_at_eps_0_and_refuses_1():
    from attncache.db.codecs import get_codec

    assert get_codec("sparse", 0.0).eps == 0.0
    with pytest.raises(UserError, match=r"sparse eps must be in \[0, 1\), got 1.0"):
        get_codec("sparse", 1.0)


def test_compact_codecs_are_small(tmp_path):
    """int8 stores a causal map in under 1/8 of its fp32 bytes; sparse keeps >= 1 - eps of every
    row's mass."""
    rng = np.random.default_rng(1)
    L = 64
    e = rand_maps(1, 2, L, rng)
    layout = StoreLayout(n_heads=2, layers=[0], codec="int8", causal=True)
    assert len(encode_entry(layout, e)) - 16 <= e.size * 4 / 8
    sharp = np.tril(np.exp(4 * rng.normal(size=(1, 2, L, L))))  # peaked rows, like real attention
    sharp = (sharp / sharp.sum(-1, keepdims=True)).astype(np.float32)
    store = write_store(tmp_path, [sharp], "sparse")
    assert store.live_bytes < sharp.size * 4 / 8
    tv = 0.5 * np.abs(store.layer(0, 0).float().numpy() - sharp[0]).sum(-1)
    assert tv.max() <= 0.02 + 0.01  # eps of the mass dropped, plus 8-bit rounding


def test_truncated_store_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    store = write_store(tmp_path, [rand_maps(1, 2, 5, rng), rand_maps(1, 2, 7, rng)])
    with open(tmp_path / seg_name(0), "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="truncated"):
        MapStore(tmp_path, store.layout, store.table, store.segments)


def test_manifest_guards(tmp_path):
    with pytest.raises(UserError, match="not a cache DB"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 999}))
    with pytest.raises(UserError, match="rebuild"):
        read_manifest(tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        read_manifest(f)


def test_pair_distance_matches_definition(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rand_maps(2, 2, 6, rng), rand_maps(2, 2, 6, rng)
    store = write_store(tmp_path, [a, b, a.copy()])
    d = pair_distance(store, 0, 1, rows=6, causal=True, rng=np.random.default_rng(0))
    want = 0.5 * np.abs(a - b).sum(-1).mean(axis=2)  # per (layer, head)
    assert np.allclose(d, want, atol=1e-6)
    assert np.allclose(
        pair_distance(store, 0, 2, rows=6, causal=True, rng=np.random.default_rng(0)), 0
    )


def test_pair_labels_add_length_term(tmp_path):
    rng = np.random.default_rng(2)
    a = rand_maps(1, 1, 8, rng)
    store = write_store(tmp_path, [a, a[:, :, :5, :5].copy()])  # exact causal prefix: TV 0
    labels, per_layer = pair_labels(
        store, np.array([[0, 1]]), ProjectorConfig(alpha=0.1, rows=8), causal=True, progress=False
    )
    assert np.allclose(per_layer, 0, atol=1e-6) and np.isclose(labels[0], 0.3)


def test_projector_learns_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    pairs = sample_pairs(np.full(60, 10), 600, rng)
    labels = np.linalg.norm(
        x[pairs[:, 0], :2] - x[pairs[:, 1], :2], axis=1
    )  # depends on 2 of 5 dims
    cfg = ProjectorConfig(epochs=40, hidden=32, out_dim=8)
    p1, rep = train(x, pairs, labels, cfg, progress=False)
    p2, _ = train(x, pairs, labels, cfg, progress=False)
    assert rep["pearson"] > 0.9
    assert np.array_equal(p1.project(x), p2.project(x))


def test_apply_maps_grouped_heads_matches_loop():
    torch.manual_seed(0)
    A = torch.softmax(torch.randn(6, 5, 5), -1)
    v = torch.randn(2, 5, 4)
    out = apply_maps(A, v, group=3)
    ref = torch.stack([A[h] @ v[h // 3] for h in range(6)])
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_half_maps_multiply_in_either_precision(monkeypatch, dtype):
    """fp16 maps with fp32 values: whichever precision the device probe picks, A @ V (all heads
    or some) matches the fp32 product, and comes back in the values' dtype."""
    from attncache.runtime import kernels

    assert kernels.product_dtype(torch.float16, torch.float32, "cpu") in (
        torch.float16,
        torch.float32,
    )
    monkeypatch.setattr(kernels, "product_dtype", lambda *_: dtype)
    torch.manual_seed(0)
    A = torch.softmax(torch.randn(6, 5, 5), -1)
    v = torch.randn(2, 5, 4)
    ref = torch.stack([A.half().float()[h] @ v[h // 3] for h in range(6)])
    out = apply_maps(A.half(), v, group=3)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-2)
    some = kernels.apply_head_maps(A.half()[[1, 4]], v, torch.tensor([0, 1]))
    assert some.dtype == torch.float32 and torch.allclose(some, ref[[1, 4]], atol=1e-2)


@pytest.mark.parametrize("approx", [False, True])
def test_index_search(approx):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(500, 16)).astype(np.float32)
    idx = VectorIndex.build(v, approximate=approx)
    d, ids = idx.search(v[:20] + 1e-4, 3)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.95
    assert np.all(np.diff(d, axis=1) >= -1e-6)
    empty = VectorIndex.build(np.zeros((0, 16), np.float32))
    assert empty.search(v[:2], 3)[1][0, 0] == -1


def test_numpy_fallback_matches_faiss(monkeypatch):
    import attncache.db.index as ix

    rng = np.random.default_rng(1)
    v = rng.normal(size=(200, 8)).astype(np.float32)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    want = VectorIndex.build(v, approximate=False).search(q, 4)
    monkeypatch.setattr(ix, "faiss", None)
    got = ix.VectorIndex.build(v, approximate=False).search(q, 4)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-4)
