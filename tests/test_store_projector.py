"""Map store round trips and guards; pair labels; projector training; index."""

import json

import numpy as np
import pytest
import torch

from attncache import UserError
from attncache.adapters import apply_maps
from attncache.index import VectorIndex
from attncache.projector import ProjectorConfig, pair_distance, pair_labels, sample_pairs, train
from attncache.store import MapStore, MapWriter, StoreLayout, read_manifest


def rand_maps(nl, h, L, rng, causal=True):
    x = rng.random((nl, h, L, L)).astype(np.float32)
    if causal:
        x = np.tril(x)
    return x / x.sum(-1, keepdims=True)


def write_store(tmp_path, entries, dtype="float32"):
    layout = StoreLayout(n_heads=entries[0].shape[1], layers=list(range(entries[0].shape[0])), dtype=dtype)
    w = MapWriter(tmp_path, layout)
    for e in entries:
        w.append(e)
    w.close()
    return MapStore(tmp_path, layout, w.lengths, w.offsets)


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3)])
def test_store_round_trip(tmp_path, dtype, tol):
    rng = np.random.default_rng(0)
    entries = [rand_maps(2, 3, L, rng) for L in (4, 9, 6)]
    store = write_store(tmp_path, entries, dtype)
    for i, e in enumerate(entries):
        assert np.abs(store.entry(i).astype(np.float32) - e).max() <= tol
        assert np.array_equal(store.layer(i, 1), store.entry(i)[1])
    assert store.layer(1, 0, length=4).shape == (3, 4, 4)


def test_truncated_store_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    store = write_store(tmp_path, [rand_maps(1, 2, 5, rng), rand_maps(1, 2, 7, rng)])
    with open(tmp_path / "maps.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="truncated"):
        MapStore(tmp_path, store.layout, store.lengths.tolist(), store.offsets.tolist())


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
    assert np.allclose(pair_distance(store, 0, 2, rows=6, causal=True, rng=np.random.default_rng(0)), 0)


def test_pair_labels_add_length_term(tmp_path):
    rng = np.random.default_rng(2)
    a = rand_maps(1, 1, 8, rng)
    store = write_store(tmp_path, [a, a[:, :, :5, :5].copy()])  # exact causal prefix: TV 0
    labels, per_layer = pair_labels(store, np.array([[0, 1]]), ProjectorConfig(alpha=0.1, rows=8), causal=True,
                                    progress=False)
    assert np.allclose(per_layer, 0, atol=1e-6) and np.isclose(labels[0], 0.3)


def test_projector_learns_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    pairs = sample_pairs(np.full(60, 10), 600, rng)
    labels = np.linalg.norm(x[pairs[:, 0], :2] - x[pairs[:, 1], :2], axis=1)  # depends on 2 of 5 dims
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
    import attncache.index as ix

    rng = np.random.default_rng(1)
    v = rng.normal(size=(200, 8)).astype(np.float32)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    want = VectorIndex.build(v, approximate=False).search(q, 4)
    monkeypatch.setattr(ix, "faiss", None)
    got = ix.VectorIndex.build(v, approximate=False).search(q, 4)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-4)
