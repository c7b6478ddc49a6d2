"""Replay exactness, the Q/K skip, hit/miss mixing, padding, crops and detaching, on every
family."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, random_seqs

from attncache import AttnCache, UserError
from attncache.inputs import collate
from attncache.runtime.adapters import get_adapter


def forward(model, seqs, causal):
    inp = collate(seqs, 0, causal)
    with torch.no_grad():
        out = model(**inp)
    y = out.logits if causal else out.last_hidden_state
    return y, inp["attention_mask"].bool()


def qk_modules(cache, model):
    names = ("q_proj", "k_proj") if cache.adapter.causal else ("query", "key")
    return [getattr(m, n) for m in cache.adapter.attention_modules(model) for n in names]


class Spy:
    """Counts calls of modules (forward hooks) and of the attention modules' original class
    forward."""

    def __init__(self, modules, attn_cls=None):
        self.calls = 0
        self.attn_calls = 0
        self.handles = [m.register_forward_hook(self._hit) for m in modules]
        self.attn_cls, self.orig = attn_cls, None
        if attn_cls is not None:
            self.orig = attn_cls.forward
            spy = self

            def counting(mod, *a, **k):
                spy.attn_calls += 1
                return spy.orig(mod, *a, **k)

            attn_cls.forward = counting

    def _hit(self, *_):
        self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()
        if self.attn_cls is not None:
            self.attn_cls.forward = self.orig


@pytest.mark.parametrize("family", FAMILIES)
def test_same_inputs_reproduce_exact_outputs(built, family):
    model, cache, seqs = built(family)
    causal = cache.adapter.causal
    ref, mask = forward(model, seqs, causal)
    with cache.attach(model, policy="all") as att:
        out, _ = forward(model, seqs, causal)
        assert all(h is not None for h in att.last_hits)
    assert (ref - out)[mask].abs().max() < 1e-4
    assert cache.stats.as_dict()["layer_maps_reused"] >= len(seqs) * cache.shape.n_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_hits_skip_q_k_and_original_attention(built, family):
    model, cache, seqs = built(family)
    causal = cache.adapter.causal
    attn_cls = type(cache.adapter.attention_modules(model)[0])
    v_name = cache.adapter.v_proj
    v_spy = Spy([getattr(m, v_name) for m in cache.adapter.attention_modules(model)])
    # Installed before attach, so replay's "original forward" is the counting one.
    spy = Spy(qk_modules(cache, model), attn_cls)
    try:
        with cache.attach(model, policy="all"):
            forward(model, seqs[:3], causal)
        hit_calls = (spy.calls, spy.attn_calls)
        with cache.attach(model, policy="all", threshold=-1.0):  # all miss: the spy must see them
            forward(model, seqs[:3], causal)
        miss_calls = (spy.calls, spy.attn_calls)
    finally:
        spy.close()
        v_spy.close()
    assert hit_calls == (0, 0)
    assert miss_calls == (2 * cache.shape.n_layers, cache.shape.n_layers)
    assert v_spy.calls == 2 * cache.shape.n_layers  # V is computed in every layer, hit or miss
    # The spy itself works: the untouched model calls both.
    spy = Spy(qk_modules(cache, model), attn_cls)
    try:
        forward(model, seqs[:3], causal)
    finally:
        spy.close()
    assert spy.calls == 2 * cache.shape.n_layers and spy.attn_calls == cache.shape.n_layers


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_policy_limits_layers(built, family):
    model, cache, seqs = built(family)
    mods = cache.adapter.attention_modules(model)
    counters = [Spy(qk_modules(cache, model)[2 * i : 2 * i + 2]) for i in range(len(mods))]
    with cache.attach(model, policy="1"):
        forward(model, seqs[:2], cache.adapter.causal)
    for c in counters:
        c.close()
    assert [c.calls for c in counters] == [2, 0, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_misses_equal_untouched_model(built, family):
    model, cache, seqs = built(family)
    causal = cache.adapter.causal
    new = random_seqs(4, seed=99)
    ref, mask = forward(model, new, causal)
    with cache.attach(model, policy="all", threshold=-1.0) as att:
        out, _ = forward(model, new, causal)
        assert all(h is None for h in att.last_hits)
    assert (ref - out)[mask].abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_padded_batch(built, family):
    model, cache, seqs = built(family)
    causal = cache.adapter.causal
    new = random_seqs(3, lo=8, hi=25, seed=7)
    batch = [seqs[0], new[0], seqs[3], new[1], seqs[5], new[2]]
    ref, mask = forward(model, batch, causal)
    with cache.attach(model, policy="all", threshold=1e-4) as att:
        out, _ = forward(model, batch, causal)
        flags = [h is not None for h in att.last_hits]
    assert flags == [True, False, True, False, True, False]
    assert (ref - out)[mask].abs().max() < 1e-4


def test_a_lookup_never_takes_an_entry_beyond_its_threshold(built):
    """The threshold calibration bounds is a hard limit: a query whose nearest compatible entry
    lies at distance d misses at any threshold under d and hits it at d and over (inclusive, as
    the calibration's ``tasks.mix`` counts it)."""
    import numpy as np

    from attncache.runtime.lookup import nearest

    model, cache, seqs = built("llama")
    db = cache.db
    feats = db.features()
    rng = np.random.default_rng(0)
    query = feats[:3] + rng.normal(0, 0.5, feats[:3].shape).astype(feats.dtype)
    lengths = [len(seqs[k]) for k in range(3)]
    found = nearest(db, query, lengths, threshold=float("inf"))
    assert all(h is not None and h.distance > 0 for h in found)
    for h, q, n in zip(found, query, lengths, strict=True):
        assert nearest(db, q[None], [n], threshold=0.6 * h.distance) == [None]
        (again,) = nearest(db, q[None], [n], threshold=1.01 * h.distance)
        assert again is not None and again.entry == h.entry and again.distance <= 1.01 * h.distance
        # at exactly its distance (as this query alone measures it: a batch's matmul may round
        # the last bit differently)
        (alone,) = nearest(db, q[None], [n], threshold=float("inf"))
        (at,) = nearest(db, q[None], [n], threshold=alone.distance)
        assert at is not None and at.entry == alone.entry


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_causal_crop_of_longer_entry_is_exact(built, family):
    model, cache, seqs = built(family)
    longest = max(seqs, key=len)
    prefix = longest[: len(longest) - 3]
    assert tuple(prefix) not in {tuple(s) for s in seqs}
    ref, mask = forward(model, [prefix], True)
    # Look up with the query's own features, but force the nearest entry to be the longer one.
    e = [i for i, L in enumerate(cache.store.lengths) if len(longest) == L][0]
    from attncache.runtime import Attachment, Hit, MapStats, PresetHits, StoreMaps

    parts = cache.parts(0.0, MapStats())
    parts.templates = None
    preset = Attachment(
        model,
        parts,
        cache.policy("all"),
        PresetHits([Hit(e, len(prefix), 0.0)]),
        StoreMaps(cache.db, False),
    )
    with preset:
        out, _ = forward(model, [prefix], True)
    assert (ref - out)[mask].abs().max() < 1e-4


def test_encoder_never_crops(built):
    _, cache, _ = built("bert")
    assert not cache.allow_crop
    assert not cache.compatible(0, int(cache.store.lengths[0]) - 1)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_detach_restores_modules(built, family):
    model, cache, seqs = built(family)
    mods = cache.adapter.attention_modules(model)
    before = [m.forward.__func__ for m in mods]
    with cache.attach(model, policy="all"):
        assert all("forward" in m.__dict__ for m in mods)
        with pytest.raises(RuntimeError), cache.attach(model):
            pass
    assert all("forward" not in m.__dict__ for m in mods)
    assert [m.forward.__func__ for m in mods] == before
    assert not model._forward_pre_hooks
    ref, mask = forward(model, random_seqs(2, seed=5), cache.adapter.causal)
    assert torch.isfinite(ref).all()


def test_db_opened_in_another_process_gives_same_hits(built, tmp_path):
    model, cache, seqs = built("llama")
    queries = seqs[:4] + random_seqs(4, seed=11)
    with cache.attach(model, policy="all") as att:
        forward(model, queries, True)
        here = [None if h is None else (h.entry, round(h.distance, 5)) for h in att.last_hits]
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from tiny import tiny_model
        from attncache import AttnCache
        from attncache.inputs import collate
        model = tiny_model("llama")
        cache = AttnCache.open({str(cache.folder)!r})
        with cache.attach(model, policy="all") as att, torch.no_grad():
            model(**collate({queries!r}, 0, True))
            hits = [None if h is None else (h.entry, round(h.distance, 5)) for h in att.last_hits]
            print(json.dumps(hits))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    import json

    there = [
        None if h is None else tuple(h) for h in json.loads(out.stdout.strip().splitlines()[-1])
    ]
    assert there == here
    assert sum(h is not None for h in here) >= 4


def test_wrong_model_is_refused(built):
    from tiny import tiny_model

    _, cache, _ = built("llama")
    other = tiny_model("llama", seed=123)
    with pytest.raises(UserError, match="another model"), cache.attach(other):
        pass


def test_unsupported_architecture_names_supported():
    class Cfg:
        model_type = "gpt2"

    with pytest.raises(UserError, match="supported: .*llama"):
        get_adapter(Cfg())


def test_stats_are_cumulative(built):
    model, cache, seqs = built("qwen2")
    cache.stats.reset()
    with cache.attach(model, policy="all"):
        forward(model, seqs[:3], True)
        forward(model, seqs[3:5] + random_seqs(1, seed=42), True)
    st = cache.stats.as_dict()
    assert st["lookups"] == 6 and st["hits"] + st["misses"] == 6 and st["hits"] >= 5
    assert st["layer_maps_total"] == 6 * cache.shape.n_layers
    assert st["lookup_s"] > 0 and st["fetch_s"] > 0


def test_reopen_matches(built):
    _, cache, _ = built("bert")
    again = AttnCache.open(cache.folder)
    assert again.threshold == cache.threshold and again.default_layers == cache.default_layers
    assert len(again.store) == len(cache.store)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_head_reuse_is_exact_on_own_maps(built, family, monkeypatch):
    """Reused heads take the (exact) recorded maps, the others are computed: outputs equal the
    model's."""
    import attncache.runtime.kernels as kernels

    model, cache, seqs = built(family)
    causal = cache.adapter.causal
    n_heads = cache.shape.n_heads
    calls = []
    real = kernels.linear_rows
    monkeypatch.setattr(
        kernels,
        "linear_rows",
        lambda lin, x, heads, d: calls.append(list(heads)) or real(lin, x, heads, d),
    )
    pol = cache.policy("heads:3")
    assert sum(len(h) for h in pol.heads.values()) == 3 and not all(pol.full(x) for x in pol.layers)
    batch = seqs[:4]
    ref, mask = forward(model, batch, causal)
    with cache.attach(model, policy=pol) as att:
        out, _ = forward(model, batch, causal)
        assert all(h is not None for h in att.last_hits)
    assert (ref - out)[mask].abs().max() < 1e-4
    g = cache.shape.group
    for layer in pol.layers:
        computed = [h for h in range(n_heads) if h not in pol.heads[layer]]
        assert computed in calls  # Q rows of the computed heads only
        assert sorted({h // g for h in computed}) in calls  # K of their groups only


def test_per_head_mixed_padded_batch(built):
    model, cache, seqs = built("qwen2")
    new = random_seqs(2, lo=8, hi=25, seed=17)
    batch = [seqs[2], new[0], seqs[7], new[1]]
    ref, mask = forward(model, batch, True)
    with cache.attach(model, policy="heads:5", threshold=1e-4) as att:
        out, _ = forward(model, batch, True)
        assert [h is not None for h in att.last_hits] == [True, False, True, False]
    assert (ref - out)[mask].abs().max() < 1e-4


def test_detach_restores_an_instance_forward_that_was_there(built):
    """accelerate (device maps, offload) installs instance-level forwards: detaching must put them
    back."""
    model, cache, seqs = built("llama")
    mods = cache.adapter.attention_modules(model)
    calls = []

    def wrapping(m):
        inner = m.forward

        def forward(*a, **k):
            calls.append(m)
            return inner(*a, **k)

        return forward

    wrappers = [wrapping(m) for m in mods]
    for m, w in zip(mods, wrappers):
        m.forward = w
    try:
        with cache.attach(
            model, policy="all", threshold=-1.0
        ):  # every item misses: the wrappers run
            forward(model, seqs[:2], True)
        assert len(calls) == len(mods)
        assert all(m.__dict__.get("forward") is w for m, w in zip(mods, wrappers))
        forward(model, seqs[:2], True)
        assert len(calls) == 2 * len(mods)
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


def test_quantized_model_with_partial_layer_policies(built):
    """Dynamic int8 linears have no weight tensor to slice: partial-head replay computes their Q/K
    whole."""
    import attncache.runtime.kernels as kernels
    from attncache.workflows.session import quantize_int8

    model, cache, seqs = built("llama")
    q = quantize_int8(model)
    lin = cache.adapter.attention_modules(q)[0].q_proj
    x = torch.randn(2, 5, 64)
    d = cache.shape.head_dim
    assert torch.equal(
        kernels.linear_rows(lin, x, [1, 3], d),
        torch.cat([lin(x)[..., d : 2 * d], lin(x)[..., 3 * d :]], -1),
    )
    ref, mask = forward(q, seqs[:3], True)
    for pol in ("heads:5", "fixed+1" if cache.templates else "heads:2"):
        with cache.attach(q, policy=pol) as att:
            out, _ = forward(q, seqs[:3], True)
            assert any(att.last_reused)
        assert (
            torch.isfinite(out).all() and (ref - out)[mask].abs().max() < 0.05
        )  # own maps: near exact


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_replay_creates_no_tensor_off_the_model_device(built, family):
    """Under a default device of 'meta', any tensor made without the model's device would not
    compute: replay with per-head, whole-layer and template policies makes every tensor on the
    data's device."""
    from attncache.build.templates import mean_maps, select

    model, cache, seqs = built(family)
    causal = cache.adapter.causal
    cache.use_templates(
        select(mean_maps(cache.store), cache.store.layout.layers, [(0, 1), (1, 2)], causal)
    )
    try:
        ref, mask = forward(model, seqs[:3] + random_seqs(1, seed=9), causal)
        inputs = collate(seqs[:3] + random_seqs(1, seed=9), 0, causal, "cpu")
        for pol in ("heads:3", "all", "fixed+1"):
            with cache.attach(model, pol) as att, torch.no_grad():
                torch.set_default_device("meta")
                try:
                    out = model(**inputs)
                finally:
                    torch.set_default_device(None)
                assert att.last_reused[:3] == [True] * 3
            y = out.logits if causal else out.last_hidden_state
            assert y.device.type == "cpu" and torch.isfinite(y).all()
            if pol != "fixed+1":  # own maps: exact
                assert (ref - y)[mask].abs().max() < 1e-4
    finally:
        cache.use_templates(None)


def test_recorded_hits_replay_a_looked_up_pass_without_searching(built, monkeypatch):
    """The workload bound's hit source: what a looked-up pass found, batch by batch, replayed over
    the same batches with maps preloaded gives the same outputs with no lookup; replayed over
    other batches it refuses."""
    from attncache.runtime import Lookup, PreloadedMaps, RecordedHits, RecordingHits, attach

    model, cache, seqs = built("llama")
    batches = [seqs[:3], seqs[3:5] + [random_seqs(1, seed=44)[0]]]
    att = cache.attach(model, policy="all", threshold=1e-4)
    att.hits = recording = RecordingHits(att.hits)
    with att:
        looked = [forward(model, b, True) for b in batches]
    assert [[h is not None for h in b] for b in recording.batches] == [
        [True] * 3,
        [True, True, False],
    ]
    hits = {h for b in recording.batches for h in b if h is not None}
    layers = range(cache.shape.n_layers)
    maps = {
        (h.entry, x, h.length): cache.fetch(h.entry, x, h.length).clone()
        for h in hits
        for x in layers
    }
    replayed = cache.attach(model, policy="all", threshold=1e-4)
    replayed.hits = RecordedHits(recording.batches)
    replayed.maps = PreloadedMaps(cache.db, maps)
    searched = []
    monkeypatch.setattr(attach, "features", lambda *a, **k: searched.append(1))
    monkeypatch.setattr(Lookup, "find", lambda *a: searched.append(1))
    with replayed:
        for (ref, mask), b in zip(looked, batches, strict=True):
            out, _ = forward(model, b, True)
            assert (ref - out)[mask].abs().max() < 1e-6
        assert replayed.last_hits == recording.batches[1]
        with pytest.raises(RuntimeError, match="other batches"):
            forward(model, seqs[:2], True)
    assert not searched  # no features, no search
