"""Template heads: mean maps, replay of fixed heads (exact on own maps, batching, no lookup), policy
specs, storage in the DB, and the attribution ranking against measured effects."""

import numpy as np
import pytest
import torch
from test_replay import forward
from tiny import FAMILIES, TinyTokenizer, random_seqs

from attncache import AttnCache, UserError
from attncache.build.record import Recorder
from attncache.build.templates import RankData, Target, mean_maps, rank, select
from attncache.db import Templates
from attncache.inputs import collate


def exact_maps(model, cache, seq) -> np.ndarray:
    """[n_layers, H, L, L] the model's own maps of ``seq``."""
    with Recorder(model, cache.adapter, list(range(cache.shape.n_layers))) as rec:
        return rec.run(collate([seq], 0, cache.adapter.causal)).maps[0]


def own_templates(model, cache, seq, heads: list[tuple[int, int]]) -> Templates:
    """Templates that are exactly ``seq``'s maps (so replaying them on ``seq`` must be exact)."""
    maps = exact_maps(model, cache, seq)
    return Templates(heads, np.stack([maps[layer, h] for layer, h in heads]), cache.adapter.causal)


def no_lookup(monkeypatch, cache):
    def boom(*a, **k):
        raise AssertionError("a template-only policy must not look anything up")

    monkeypatch.setattr(cache, "lookup", boom)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_mean_maps_average_each_element_over_the_entries_that_have_it(built, family):
    _model, cache, _seqs = built(family)
    means = mean_maps(cache.store)
    lengths = [int(x) for x in cache.store.lengths]
    Lt = max(lengths)
    assert means.shape == (len(cache.store.layout.layers), cache.shape.n_heads, Lt, Lt)
    for pos, layer in enumerate(cache.store.layout.layers):
        full = np.full((len(lengths), cache.shape.n_heads, Lt, Lt), np.nan)
        for e, L in enumerate(lengths):
            full[e, :, :L, :L] = cache.fetch(e, layer, L).numpy()
        ref = np.nanmean(full, axis=0)
        assert np.allclose(means[pos], ref, atol=1e-6)
    if cache.adapter.causal:
        rows = means.sum(-1)
        assert np.allclose(rows, 1.0, atol=1e-5)  # a causal row's mean is a distribution


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_heads_on_own_maps_are_exact_and_skip_their_q_rows(built, family, monkeypatch):
    import attncache.runtime.kernels as kernels

    model, cache, seqs = built(family)
    H = cache.shape.n_heads
    heads = [(0, h) for h in range(H)] + [(1, 1), (2, 0), (2, 3)]  # a whole layer and single heads
    cache.use_templates(own_templates(model, cache, seqs[0], heads))
    cache.stats.reset()  # the fixture's cache is shared with other tests
    try:
        no_lookup(monkeypatch, cache)
        calls = []
        real = kernels.linear_rows
        monkeypatch.setattr(
            kernels,
            "linear_rows",
            lambda lin, x, hs, d: calls.append(list(hs)) or real(lin, x, hs, d),
        )
        ref, mask = forward(model, [seqs[0]], cache.adapter.causal)
        pol = cache.policy("fixed")
        assert pol.fixed == {0: tuple(range(H)), 1: (1,), 2: (0, 3)} and not pol.retrieves
        with cache.attach(model, pol) as att:
            out, _ = forward(model, [seqs[0]], cache.adapter.causal)
        assert (ref - out)[mask].abs().max() < 1e-4
        assert att.last_reused == [True]
        assert [0, 2, 3] in calls and [1, 2] in calls  # Q rows of the computed heads only
        assert (
            len(calls) == 2 * 2
        )  # Q and K for layers 1 and 2; layer 0 (all fixed) computes neither
        st = cache.stats.as_dict()
        assert st["lookups"] == 0 and st["layer_maps_reused"] == pytest.approx((H + 3) / H)
    finally:
        cache.use_templates(None)
        cache.stats.reset()


def test_causal_templates_crop_exactly_for_shorter_inputs(built):
    model, cache, seqs = built("llama")
    heads = [(1, 0), (1, 2), (2, 1)]
    cache.use_templates(own_templates(model, cache, seqs[3], heads))
    try:
        x = seqs[3]
        batch = [
            x,
            x[: len(x) - 3],
        ]  # a prefix of the templates' input: its maps are their top-left crop
        ref, mask = forward(model, batch, True)
        with cache.attach(model, "fixed"):
            out, _ = forward(model, batch, True)
        assert (ref - out)[mask].abs().max() < 1e-4
    finally:
        cache.use_templates(None)


def test_mixed_batch_equals_items_one_by_one(built):
    """Template heads, retrieved heads, misses and left padding in one batch: each item as if
    alone."""
    model, cache, seqs = built("qwen2")
    means = mean_maps(cache.store)
    cache.use_templates(
        select(means, cache.store.layout.layers, [(0, 1), (2, 2), (1, 0), (1, 3)], True)
    )
    try:
        pol = cache.policy("fixed+2")
        assert pol.fixed == {0: (1,), 1: (0, 3), 2: (2,)} and pol.heads == {2: (0, 1, 3)}
        new = random_seqs(2, lo=6, hi=12, seed=17)  # shorter than the templates (the longest entry)
        batch = [seqs[2], new[0], seqs[7], new[1]]
        with cache.attach(model, pol, threshold=1e-4) as att:
            out, mask = forward(model, batch, True)
            assert [h is not None for h in att.last_hits] == [True, False, True, False]
            assert att.last_reused == [True] * 4
            alone = [forward(model, [x], True)[0][0] for x in batch]
        for j, x in enumerate(batch):
            assert (out[j][mask[j]] - alone[j][-len(x) :]).abs().max() < 1e-4
        exact, _ = forward(model, batch, True)
        assert (exact - out)[mask].abs().max() > 1e-3  # mean maps are not the exact ones
    finally:
        cache.use_templates(None)


def test_inputs_longer_than_templates_and_kv_cache_forwards_compute_exactly(built):
    model, cache, seqs = built("llama")
    means = mean_maps(cache.store)[:, :, :6, :6]
    cache.use_templates(select(means, cache.store.layout.layers, [(0, 0), (1, 1), (2, 2)], True))
    try:
        long = [x for x in seqs if len(x) > 6][:2]
        ref, mask = forward(model, long, True)
        with cache.attach(model, "fixed") as att:
            out, _ = forward(model, long, True)
            assert att.last_reused == [False, False]
            short = [x[:5] for x in long]
            inp = collate(short, 0, True)
            with torch.no_grad():
                kv = model(
                    **inp, use_cache=True
                ).logits  # the prefix tier's insert pass: keys must be real
                assert att.last_reused == [False, False]
                templ = model(**inp).logits
                assert att.last_reused == [True, True]
        assert (ref - out)[mask].abs().max() < 1e-4
        with torch.no_grad():
            plain = model(**inp).logits
        assert (kv - plain).abs().max() < 1e-4 and (templ - plain).abs().max() > 1e-4
    finally:
        cache.use_templates(None)


def test_templates_persist_survive_inserts_and_verify(built, tmp_path):
    model, cache0, seqs = built("llama")
    db = tmp_path / "db"
    cache = AttnCache.build(model, TinyTokenizer(), seqs, db, progress=False)
    with pytest.raises(UserError, match="no template maps"):
        cache.policy("fixed")
    means = mean_maps(cache.store)
    order = [(2, 1), (0, 3), (1, 1)]
    cache.set_templates(select(means, cache.store.layout.layers, order, True), {"source": "test"})
    again = AttnCache.open(db)
    assert again.templates.heads == order
    assert np.allclose(again.templates.maps, means[[2, 0, 1], [1, 3, 1]], atol=1e-3)
    assert again.policy("fixed:2").fixed == {2: (1,), 0: (3,)}
    with pytest.raises(UserError, match="N=4"):
        again.policy("fixed:4")
    assert AttnCache.verify(db) == []
    again.learn(model, random_seqs(3, seed=99))
    assert AttnCache.open(db).templates.heads == order and AttnCache.verify(db) == []
    again.set_templates(None)
    assert AttnCache.open(db).templates is None and not list(db.glob("templates-*"))
    assert AttnCache.verify(db) == []


def test_attribution_predicts_the_measured_margin_change(built):
    """First order: for a small step towards the template, the predicted change of a choice margin
    matches the measured one; a head whose template equals its exact map scores zero."""
    model, cache, seqs = built("llama")
    x = seqs[4]
    L = len(x)
    layers = cache.store.layout.layers
    own = exact_maps(model, cache, x)  # [nl, H, L, L] (every layer is stored)
    uniform = np.tril(np.ones((L, L))) / np.arange(1, L + 1)[:, None]
    step = own.copy()
    step[1, 2] = 0.9 * own[1, 2] + 0.1 * uniform  # only head (1, 2) differs from the exact maps
    targets = [
        Target(0, [(1, 5, 1.0), (1, 9, -1.0)], row=0)
    ]  # margin: log p(5) - log p(9) at the end
    score = rank(RankData(model, cache.adapter, step.astype(np.float32), layers, [x], targets))
    assert score[1, 2] > 0 and np.delete(score.ravel(), 1 * cache.shape.n_heads + 2).max() < 1e-6
    cache.use_templates(Templates([(1, 2)], step[1, 2][None].astype(np.float32), True))
    try:

        def margin(pol):
            with cache.attach(model, pol) if pol else torch.no_grad(), torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, -1], -1)
            return float(lp[5] - lp[9])

        measured = abs(margin("fixed") - margin(None))
    finally:
        cache.use_templates(None)
    assert measured > 0 and score[1, 2] == pytest.approx(measured, rel=0.15)


def test_choice_targets_are_the_exact_decision_margin():
    from attncache.build.calibrate import choice_targets
    from attncache.tasks import Plan, Query, RowPlan, RunOutput

    # row 0: one prompt, single-token choices 5 / 9 / 7; row 1: two continuation sequences
    rows = [
        RowPlan(
            "choice1", [0], [[Query(0, 1, 5)], [Query(0, 1, 9)], [Query(0, 1, 7)]], [1.0, 1.0, 1.0]
        ),
        RowPlan(
            "choiceN", [1, 2], [[Query(1, 2, 3), Query(1, 1, 4)], [Query(2, 1, 8)]], [4.0, 2.0]
        ),
    ]
    lp = {
        (0, 1, 5): -2.0,
        (0, 1, 9): -0.5,
        (0, 1, 7): -1.0,
        (1, 2, 3): -1.0,
        (1, 1, 4): -1.0,
        (2, 1, 8): -3.0,
    }
    exact = RunOutput(lp, [0, 0, 0], None, [False] * 3, 0.0, [float("inf")] * 3)
    plan = Plan([[1], [1, 2], [1, 3]], rows, [], True)
    t = choice_targets(plan, exact, [0, 1])
    # row 0: best is token 9 (-0.5), runner-up 7 (-1.0); row 1: best is seq 1 (-2/4), runner-up seq
    # 2 (-3/2)
    assert [(x.seq, x.row, sorted(x.terms)) for x in t] == [
        (0, 0, [(1, 7, -1.0), (1, 9, 1.0)]),
        (1, 1, [(1, 4, 0.25), (2, 3, 0.25)]),
        (2, 1, [(1, 8, -0.5)]),
    ]


def test_ranking_with_heads_already_fixed_measures_the_edited_model(built):
    """With head A's template in place, head B's estimate matches the measured change of serving B
    too."""
    model, cache, seqs = built("llama")
    x = seqs[4]
    L = len(x)
    layers = cache.store.layout.layers
    own = exact_maps(model, cache, x)
    uniform = np.tril(np.ones((L, L))) / np.arange(1, L + 1)[:, None]
    step = own.copy()
    step[0, 1] = 0.5 * own[0, 1] + 0.5 * uniform  # A = (0, 1): a big change, fixed first
    step[2, 3] = 0.9 * own[2, 3] + 0.1 * uniform  # B = (2, 3): a small step, estimated under A
    targets = [Target(0, [(1, 5, 1.0), (1, 9, -1.0)], row=0)]
    data = RankData(model, cache.adapter, step.astype(np.float32), layers, [x], targets)
    score = rank(data, fixed=[(0, 1)])
    assert score[0, 1] == np.inf and score[2, 3] > 0
    cache.use_templates(
        Templates([(0, 1), (2, 3)], np.stack([step[0, 1], step[2, 3]]).astype(np.float32), True)
    )
    try:

        def margin(pol):
            with cache.attach(model, pol), torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, -1], -1)
            return float(lp[5] - lp[9])

        measured = abs(margin("fixed:2") - margin("fixed:1"))
    finally:
        cache.use_templates(None)
    assert score[2, 3] == pytest.approx(measured, rel=0.15)


def test_policy_specs_unions_and_errors():
    from attncache.db import Shape
    from attncache.runtime.policy import from_json, parse_policy

    th = [(5, 1), (2, 0), (5, 2), (7, 3)]
    pol = parse_policy("fixed:3+5,7", 8, 4, {}, None, th)
    assert pol.fixed == {5: (1, 2), 2: (0,)} and pol.heads == {
        5: (0, 3),
        7: (0, 1, 2, 3),
    }  # fixed wins
    assert pol.retrieves and pol.fixed_maps() == 3 / 4 and pol.head_maps({5, 7}) == 6 / 4
    again = from_json(pol.to_json(), 4)  # what the manifest stores round-trips
    assert again.heads == pol.heads and again.fixed == pol.fixed
    assert not parse_policy("fixed", 8, 4, {}, None, th).retrieves
    for bad, msg in (
        ("fixed:0", "N=0"),
        ("fixed:5", "N=5"),
        ("fixed:x", "integer"),
        ("all+fixed:9", "N=9"),
    ):
        with pytest.raises(UserError, match=msg):
            parse_policy(bad, 8, 4, {}, None, th)
    with pytest.raises(UserError, match="no template maps"):
        parse_policy("fixed", 8, 4, {}, None, None)
    # attention FLOPs: every head of every layer reusing skips exactly half here (q and k
    # projections, and QK^T, of q/k/v/o projections, QK^T and A @ V when the model width is H * d)
    shape = Shape(8, 4, 4, 16)
    assert parse_policy("all", 8, 4, {}).work_saved(
        shape, 33, True, set(range(8)), hit=True
    ) == pytest.approx(0.5)
    assert (
        parse_policy("all", 8, 4, {}).work_saved(shape, 33, True, set(range(8)), hit=False) == 0.0
    )
    one = parse_policy("fixed:1", 8, 4, {}, None, th).work_saved(shape, 33, True, set(), hit=False)
    D, d = 64, 16
    per_layer = 2 * D * D + 4 * D * D + 2 * D * D + 4 * D * 17
    assert one == pytest.approx(
        (2 * D * d + 2 * d * 17 + 2 * D * d) / (8 * per_layer)
    )  # G = H: its K too
