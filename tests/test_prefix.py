"""The exact prefix K/V tier: exactness, radix tree structure, the byte cap, composition with map
reuse."""

import pytest
import torch
from tiny import random_seqs, tiny_model

from attncache.inputs import collate
from attncache.tiers import PrefixTier, RadixKV, TierOptions, supports_prefix


def exact_logits(model, seqs, keep):
    with torch.no_grad():
        return [model(**collate([s], 0, True), logits_to_keep=keep).logits[0] for s in seqs]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_moe"])
def test_prefix_tier_is_exact(family):
    model = tiny_model(family)
    base = random_seqs(1, lo=40, hi=40, seed=3)[0]
    first = [base + [5, 6, 7], random_seqs(1, seed=8)[0]]
    second = [
        base + [9],
        base[:20] + [1, 2, 3, 4],
        base + [5, 6, 7, 8, 9],
        random_seqs(1, seed=9)[0],
        base[:25],
    ]
    runner = PrefixTier(model, min_prefix=4)
    got1 = runner.run(first, 2, 0).logits
    got2 = runner.run(second, 2, 0).logits
    ref = exact_logits(model, first + second, 2)
    for r, g in zip(ref, list(got1) + list(got2)):
        assert (r - g).abs().max() < 1e-4
    st = runner.stats.as_dict()
    # reuse is capped at len - keep (those positions' logits must run): base+[9]: 41 - 2 = 39;
    # base[:20]+..: 20 shared; base+[5..9]: 45 - 2 = 43; base[:25]: 25 - 2 = 23
    assert st["tokens_reused"] == 39 + 20 + 43 + 23
    assert st["items_with_prefix"] == 4


def test_short_prefixes_run_whole():
    model = tiny_model("llama")
    base = random_seqs(1, lo=30, hi=30, seed=3)[0]
    runner = PrefixTier(model, min_prefix=16)
    runner.run([base], 1, 0)
    runner.run([base[:10] + [3, 4, 5]], 1, 0)
    assert runner.stats.tokens_reused == 0


def test_radix_split_and_match():
    t = RadixKV(max_bytes=1 << 20)
    kv = lambda n, val: torch.full((2, 2, 1, n, 3), float(val))  # noqa: E731
    a, b = [1, 2, 3, 4, 5], [1, 2, 3, 9]
    t.insert(a, kv(5, 1))
    t.insert(b, kv(4, 2))
    m = t.match([1, 2, 3, 9, 9], max_len=5)
    assert m.length == 4 and m.kv().shape[3] == 4
    assert m.kv()[0, 0, 0, 3, 0] == 2  # the 9 came from b
    assert m.kv()[0, 0, 0, 0, 0] == 1  # the shared run is kept once (from a)
    assert t.match([1, 2, 3, 4, 5], max_len=3).length == 3
    assert t.match([7], max_len=1).length == 0
    assert len(t) == 2 and t.bytes == (5 + 1) * 2 * 2 * 3 * 4


def test_insert_suffix_only_needs_its_prefix_in_the_tree():
    t = RadixKV(max_bytes=1 << 20)
    kv = lambda n, val: torch.full((2, 2, 1, n, 3), float(val))  # noqa: E731
    assert t.insert([1, 2, 3, 4], kv(4, 1)).inserted
    assert t.insert(
        [1, 2, 3, 4, 7, 8], kv(2, 2), start=4
    ).inserted  # only the new tokens' K/V is passed
    m = t.match([1, 2, 3, 4, 7, 8], max_len=6)
    got = m.kv()[0, 0, 0, :, 0].tolist()
    assert m.length == 6 and got == [1, 1, 1, 1, 2, 2]
    # a prefix that is not (or no longer) in the tree: nothing is inserted
    before = t.bytes
    assert not t.insert([5, 6, 7, 8], kv(2, 3), start=2).inserted
    assert not t.insert(
        [1, 2, 9, 9, 9], kv(1, 3), start=4
    ).inserted  # diverges inside the claimed prefix
    assert t.bytes == before and t.peak_bytes == before


def test_byte_cap_never_exceeded_and_lru_evicted():
    per_token = 2 * 2 * 1 * 3 * 4
    t = RadixKV(max_bytes=25 * per_token)
    seqs = [[k] + list(range(100, 109)) for k in range(6)]  # 10 tokens each, nothing shared
    for s in seqs[:2]:
        t.insert(s, torch.zeros(2, 2, 1, 10, 3))
    t.match(seqs[0], 10)  # touch the first: the second is now least recently used
    t.insert(seqs[2], torch.zeros(2, 2, 1, 10, 3))
    assert t.bytes <= t.max_bytes
    assert t.match(seqs[0], 10).length == 10 and t.match(seqs[1], 10).length == 0
    assert t.match(seqs[2], 10).length == 10
    for s in seqs[3:]:
        t.insert(s, torch.zeros(2, 2, 1, 10, 3))
        assert t.bytes <= t.max_bytes
    full = RadixKV(max_bytes=20 * per_token)  # exactly two inputs' bytes: both stay
    for s in seqs[:2]:
        full.insert(s, torch.zeros(2, 2, 1, 10, 3))
    assert full.bytes == full.max_bytes and len(full) == 2


def test_a_locked_path_is_never_evicted_and_is_evictable_once_unlocked():
    """A caller still reading a prefix's K/V locks its path: pressure evicts other leaves (or
    stays over budget) but never that path, whatever its age; unlocked, it goes first."""
    per_token = 2 * 2 * 1 * 3 * 4
    t = RadixKV(max_bytes=25 * per_token)
    seqs = [[k] + list(range(100, 109)) for k in range(4)]  # 10 tokens each, nothing shared
    t.insert(seqs[0], torch.zeros(2, 2, 1, 10, 3))
    held = t.match(seqs[0], 10)
    t.lock(held.node)
    for s in seqs[1:]:  # the locked path is the least recently used throughout
        t.insert(s, torch.zeros(2, 2, 1, 10, 3))
    assert t.match(seqs[0], 10).length == 10
    assert t.match(seqs[3], 10).length == 10  # the newest stays; the one between went
    assert t.match(seqs[1], 10).length == 0
    t.unlock(held.node)
    t.match(seqs[3], 10)  # seqs[0] is again the least recently used of the two
    t.insert([9] + list(range(100, 109)), torch.zeros(2, 2, 1, 10, 3))
    assert t.match(seqs[0], 10).length == 0 and t.bytes <= t.max_bytes


def test_composition_with_map_reuse(built):
    model, cache, seqs = built("llama")
    runner = PrefixTier(model, min_prefix=4)
    new = random_seqs(2, lo=12, hi=12, seed=21)
    with cache.attach(model, policy="all", threshold=1e-4) as att:
        # seqs[0] hits the map cache, new[0] misses
        hits = runner.run([seqs[0], new[0]], 1, 0, TierOptions(maps=att)).hits
        assert hits[0] is not None and hits[1] is None
        # Only the miss was inserted (the hit computed no keys in reused layers).
        assert runner.tree.match(new[0], len(new[0])).length == len(new[0])
        assert runner.tree.match(seqs[0], len(seqs[0])).length == 0
        logits, hits2 = runner.run([new[0][:-1] + [77], seqs[1]], 1, 0, TierOptions(maps=att))[:2]
    assert runner.stats.items_with_prefix == 1 and hits2[0] is None
    ref = exact_logits(model, [new[0][:-1] + [77], seqs[1]], 1)
    for r, g in zip(ref, logits):
        assert (r - g).abs().max() < 1e-4


def test_kept_kv_are_their_own_inputs_when_a_batch_mixes_a_map_hit_and_an_unkept_input(built):
    """A batch of [computed, not kept | replayed a map | computed, kept]: the replayed row holds no
    place in its layers' K/V, the unkept one does. Before 2026-12-07 the kept input's place was
    counted among the kept rows only, so the tree stored the unkept input's K/V under its tokens
    and a later input reading them was off by 0.55 in its logits."""
    model, cache, seqs = built("llama")
    runner = PrefixTier(model, min_prefix=4)
    first, kept = random_seqs(2, lo=14, hi=14, seed=33)
    with cache.attach(model, policy="all", threshold=1e-4) as att:
        hits = runner.run(
            [first, seqs[0], kept], 1, 0, TierOptions(maps=att, insert=[0, 0, len(kept)])
        ).hits
    assert hits[0] is None and hits[1] is not None and hits[2] is None
    assert runner.tree.match(first, len(first)).length == 0  # not kept
    assert runner.tree.match(kept, len(kept)).length == len(kept)
    later = kept + [5, 6]
    got = runner.run([later], 1, 0)
    assert got.prefix_tokens[0] == len(kept)
    assert (exact_logits(model, [later], 1)[0] - got.logits[0]).abs().max() < 1e-4


def test_tier_goes_idle_without_shared_prefixes():
    from attncache.tiers.prefix import IDLE_AFTER

    model = tiny_model("llama")
    runner = PrefixTier(model, min_prefix=4)
    for s in random_seqs(IDLE_AFTER + 4, lo=10, hi=12, seed=50):
        runner.run([s], 1, 0)
    assert runner.idle and runner.stats.tokens_reused == 0
    n = len(runner.tree)
    runner.run([random_seqs(1, seed=77)[0]], 1, 0)
    assert len(runner.tree) == n  # no more insertions


def test_an_idle_tier_re_arms_when_the_traffic_starts_sharing():
    """A long-lived server: after 64 inputs that share nothing the tier idles, and a later stream
    of requests on one prompt (one request per batch, as a server sees them) is reused again,
    exactly. On 9cecc0c the tier stayed idle for the process's life."""
    from attncache.tiers.prefix import IDLE_AFTER

    model = tiny_model("llama")
    runner = PrefixTier(model, min_prefix=4)
    for s in random_seqs(IDLE_AFTER + 4, lo=10, hi=12, seed=50):
        runner.run([s], 1, 0)
    assert runner.idle
    prompt = random_seqs(1, lo=24, hi=24, seed=51)[0]
    tails = random_seqs(6, lo=2, hi=4, seed=52)
    outs = [runner.run([prompt + t], 1, 0) for t in tails]
    assert not runner.idle
    assert sum(o.prefix_tokens[0] for o in outs[2:]) >= 3 * len(prompt)  # reused once re-armed
    for t, o in zip(tails, outs, strict=True):
        with torch.no_grad():
            ref = model(torch.tensor([prompt + t])).logits[0, -1]
        assert (ref - o.logits[0][-1]).abs().max() < 1e-4


class TokenCounter:
    """Counts the tokens a model's forwards process (a forward pre-hook on the input ids)."""

    def __init__(self, model):
        self.tokens, self.calls = 0, 0
        self.shapes: list[tuple[int, ...]] = []
        # on the embeddings: every forward passes there, whichever module the caller runs
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self._count)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _count(self, _mod, args):
        ids = args[0]
        self.calls += 1
        self.shapes.append(tuple(ids.shape))
        self.tokens += int((ids != 0).sum())  # real tokens: test ids are 1..127, padding is 0


def test_continuations_in_one_batch_compute_the_prompt_once():
    """One prompt with three continuations in a batch: the prompt's tokens run once, in one row
    with the three suffixes (a single forward); the unrelated input runs whole."""
    model = tiny_model("llama")
    prompt = random_seqs(1, lo=24, hi=24, seed=61)[0]
    other = random_seqs(1, seed=62)[0]
    batch = [prompt + [7, 8, 9], prompt + [10, 11], other, prompt + [12, 13, 14, 15]]
    runner = PrefixTier(model, min_prefix=8)
    with TokenCounter(model) as counter:
        got = runner.run(batch, 3, 0).logits
    ref = exact_logits(model, batch, 3)
    for r, g in zip(ref, got):
        assert (r - g).abs().max() < 1e-4
    # shared: 24 tokens, but the last 3 positions of the shortest (26 tokens) must run: 23 reused
    assert counter.tokens == 23 + (4 + 3 + 5) + len(other)
    assert counter.calls == 2  # the unrelated input; the prompt and all its suffixes at once
    # the first continuation computes the prompt, the other two reuse it
    assert runner.stats.items_with_prefix == 3 and runner.stats.tokens_reused == 2 * 23


def test_several_prefix_groups_ragged_suffixes_padding_and_a_loner_in_one_batch():
    """Two groups with different prompts (one already in the tree, one new), ragged suffixes, and an
    input sharing nothing: every output equals the uncached model's (1e-4)."""
    model = tiny_model("qwen2")
    a, b = random_seqs(2, lo=18, hi=30, seed=71)
    runner = PrefixTier(model, min_prefix=8)
    runner.run([a + [3, 4]], 1, 0)  # a is in the tree now
    loner = random_seqs(1, lo=9, hi=9, seed=72)[0]
    batch = [
        b + [5],
        a + [9, 9, 9, 9, 9, 9],
        loner,
        b + [6, 7, 8],
        a + [1],
        b + [2, 2, 2, 2, 2, 2, 2, 2],
    ]
    got = runner.run(batch, 2, 0).logits
    ref = exact_logits(model, batch, 2)
    for r, g in zip(ref, got):
        assert (r - g).abs().max() < 1e-4
    assert runner.stats.items_with_prefix == 5


def test_inputs_shorter_than_keep_beside_prefix_matches_come_back_whole():
    """Long continuations on a shared prompt set ``keep``; a fresh input shorter than ``keep``
    (HellaSwag-style endings) runs apart from them: it gets the logits of all its positions, the
    others of their last ``keep``, each equal to the uncached model's."""
    model = tiny_model("llama")
    prompt = random_seqs(1, lo=20, hi=20, seed=81)[0]
    short = random_seqs(1, lo=6, hi=6, seed=82)[0]
    keep = 9
    batch = [prompt + list(range(3, 12)), short, prompt + list(range(12, 21))]
    runner = PrefixTier(model, min_prefix=8)
    got = runner.run(batch, keep, 0).logits
    assert [len(g) for g in got] == [keep, len(short), keep]
    ref = exact_logits(model, batch, keep)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape and (r - g).abs().max() < 1e-4
    assert runner.stats.items_with_prefix == 2


def test_lookup_hits_that_reuse_nothing_are_still_inserted(built):
    model, cache, seqs = built("llama")
    runner = PrefixTier(model, min_prefix=4)
    with cache.attach(model, policy="none") as att:
        runner.run([seqs[0]], 1, 0, TierOptions(maps=att))
        assert att.last_hits[0] is not None and not att.last_reused[0]
    assert runner.tree.match(seqs[0], len(seqs[0])).length == len(seqs[0])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen2_moe"])
@pytest.mark.parametrize("pack", [True, False])
def test_one_prompt_many_continuations_packed_or_not_is_exact(family, pack):
    """A prompt and its continuations: the prompt runs once, the continuations in one row (pack: a
    block mask, positions restarting where the prompt ends) or a row each; outputs equal separate
    runs."""
    model = tiny_model(family)
    prompt = random_seqs(1, lo=20, hi=20, seed=81)[0]
    other = random_seqs(1, lo=15, hi=15, seed=82)[0]
    conts = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 13]]
    batch = [prompt + c for c in conts] + [other + [1, 2], other + [3]]
    runner = PrefixTier(model, min_prefix=8, pack=pack)
    got = runner.run(batch, 2, 0).logits
    ref = exact_logits(model, batch, 2)
    for r, g in zip(ref, got):
        assert (r - g).abs().max() < 1e-4
    assert runner.stats.items_with_prefix == 6


def test_packed_rows_stay_within_the_prefix_length_and_exact():
    """Long continuations on a short cached prompt fill several packed rows (a row's attention
    grows with its whole width), each within max(PACK_MIN_TOKENS, prefix) suffix tokens; outputs
    are exact."""
    from attncache.tiers.rows import PACK_MIN_TOKENS

    model = tiny_model("llama")
    prompt = random_seqs(1, lo=10, hi=10, seed=83)[0]
    conts = [[3 + k] * 12 for k in range(4)]  # 48 suffix tokens on a 10-token prompt
    batch = [prompt + c for c in conts]
    runner = PrefixTier(model, min_prefix=8, pack=True)
    runner.run([prompt + [1]], 1, 0)  # the prompt is in the tree now
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: shapes.append(tuple(args[0].shape))
    )
    try:
        got = runner.run(batch, 1, 0).logits
    finally:
        hook.remove()
    for r, g in zip(exact_logits(model, batch, 1), got, strict=True):
        assert (r - g).abs().max() < 1e-4
    suffix_rows = shapes[-1]  # the last forward ran the suffixes
    assert suffix_rows[0] > 1 and suffix_rows[1] <= max(PACK_MIN_TOKENS, len(prompt))
    assert suffix_rows[0] * suffix_rows[1] >= 48


def test_nested_prefixes_group_by_the_deepest_prefix_that_saves_most():
    """A header every input shares, then per subject a long prompt: groups are the subjects, not
    one group over the header (whose suffixes would each carry a whole subject prompt)."""
    from attncache.tiers.schedule import prefix_groups

    header = list(range(100, 112))
    a, b = header + [1] * 40, header + [2] * 40
    seqs = [a + [5], b + [6, 6], a + [7, 7], [9] * 3, b + [8], a + [4]]
    assert [sorted(g) for g in prefix_groups(seqs, 8)] == [[0, 2, 5], [1, 4], [3]]
    # a pair inside a subject that shares a few more tokens does not split the subject
    seqs = [a + [5, 5, 1], a + [5, 5, 2], a + [6], a + [7]]
    assert [sorted(g) for g in prefix_groups(seqs, 8)] == [[0, 1, 2, 3]]
    # many inputs sharing fewer than min_prefix tokens are no group, however many they are:
    # the pair among them sharing 12 still is
    short = [50, 51, 52]
    seqs = [short + [k] * 5 for k in range(1, 9)] + [short + [60] * 9 + [1], short + [60] * 9]
    assert [sorted(g) for g in prefix_groups(seqs, 8) if len(g) > 1] == [[8, 9]]


def test_schedule_groups_shared_prefixes_first():
    from attncache.tiers.schedule import prefix_batches, prefix_groups

    a, b = [1] * 10, [2] * 10
    seqs = [a + [5], [9, 9, 9], b + [1, 1], a + [6, 6], [8], b + [3], a + [7]]
    groups = prefix_groups(seqs, 8)
    assert groups == [[0, 3, 6], [1], [2, 5], [4]]  # ordered by first member
    batches = prefix_batches(seqs, 3, 8)
    # the smaller group (b's, 23 tokens) first, each by length, then a's (34 tokens), then the rest
    assert batches[0] == [5, 2, 0] and batches[1] == [6, 3, 4]
    assert sorted(i for bt in batches for i in bt) == list(range(7))
    assert prefix_batches([[1, 2], [3, 4, 5]], 8, 8) == [[0, 1]]  # nothing shared: by length


def test_batches_are_sized_by_the_tokens_the_tier_runs():
    """Given what each group reuses, a batch holds as many inputs as run the tokens of
    ``batch_size`` average inputs (a prompt's short suffixes go many to a batch), capped."""
    from attncache.tiers.schedule import MAX_INPUTS_FACTOR, prefix_batches, prefix_groups

    prompt = list(range(100, 160))  # 60 shared tokens, then a 2-token suffix each
    group = [prompt + [k, k + 1] for k in range(0, 60, 2)]
    for loner, sizes in ((62, [16, 16]), (200, [16, 15, 1])):
        seqs = group + [[7] * loner, [8] * loner]
        groups = prefix_groups(seqs, 8)
        reusable = [60 if len(g) > 1 else 0 for g in groups]
        batches = prefix_batches(seqs, 4, 8, groups, reusable)
        assert sorted(i for b in batches for i in b) == list(range(len(seqs)))
        # the prompt once and 15 suffixes (92 tokens) fill the first batch to its cap of 16
        # inputs; short loners join the rest of the group, long ones break the token budget
        assert [len(b) for b in batches] == sizes and sizes[0] == MAX_INPUTS_FACTOR * 4
        budget = 4 * sum(map(len, seqs)) / len(seqs)
        for b in batches:  # within the budget, or a single input
            run = sum(len(seqs[i]) - (60 if i < 30 and i != batches[0][0] else 0) for i in b)
            assert run <= budget or len(b) == 1
        # without what is reused, batches are counted in inputs, as before
        assert [len(b) for b in prefix_batches(seqs, 4, 8, groups)] == [4] * 8


def test_workload_without_shared_prefixes_skips_the_tier():
    """A workload in which nothing is shared never builds a K/V cache: the plain model runs."""
    from attncache.tasks import Plan, Query, RowPlan, RunOptions, Tiers, run

    model = tiny_model("llama")
    seqs = random_seqs(6, lo=9, hi=12, seed=90)
    plan = Plan(seqs, [RowPlan("text", [i], [[Query(i, 1, 3)]], [1.0]) for i in range(6)], [], True)
    runner = PrefixTier(model, min_prefix=4)
    with TokenCounter(model) as counter:
        run(
            model,
            TinyTok(),
            plan,
            RunOptions(batch_size=4, progress=False),
            tiers=Tiers(prefix=runner),
        )
    assert runner.stats.items == 0 and runner.tree.bytes == 0  # the tier was not even asked
    assert counter.tokens == sum(len(s) for s in seqs)


class TinyTok:
    pad_token_id = 0


def test_workload_sharing_few_of_its_tokens_runs_plain():
    """Long endings sharing a short prompt run without the tier (it would cost more than the few
    tokens it saves); the same endings on a long shared prompt run with it. Answers are exact
    either way."""
    from attncache.tasks import Plan, Query, RowPlan, RunOptions, Tiers, run
    from attncache.tasks.run import MIN_SAVED_SHARE

    model = tiny_model("llama")
    for prompt_len, used in ((6, False), (40, True)):
        prompts = random_seqs(3, lo=prompt_len, hi=prompt_len, seed=95)
        ends = random_seqs(6, lo=30, hi=30, seed=96)
        seqs = [p + e for p in prompts for e in ends[:4]]
        share = 3 * 3 * prompt_len / sum(len(s) for s in seqs)  # each prompt runs once, not 4x
        assert (share >= MIN_SAVED_SHARE) == used
        rows = [RowPlan("text", [i], [[Query(i, 1, 3)]], [1.0]) for i in range(len(seqs))]
        runner = PrefixTier(model, min_prefix=4)
        got = run(
            model,
            TinyTok(),
            Plan(seqs, rows, [], True),
            RunOptions(batch_size=6, progress=False),
            tiers=Tiers(prefix=runner),
        )
        ref = run(
            model, TinyTok(), Plan(seqs, rows, [], True), RunOptions(batch_size=6, progress=False)
        )
        assert (runner.stats.items_with_prefix > 0) == used
        assert got.logprobs.keys() == ref.logprobs.keys() and got.argmax == ref.argmax
        for k, v in ref.logprobs.items():
            assert got.logprobs[k] == pytest.approx(v, abs=1e-4)


@pytest.mark.parametrize("head", [True, False])
def test_cached_rows_an_in_row_group_and_a_loner_share_one_forward(head, monkeypatch):
    """A batch mixing inputs over a cached prompt, a new prompt's group (computed in its own row)
    and an input sharing nothing: one forward for every prefixed input, one for the loner, and
    every output equal to the uncached model's (the head on needed positions only, or the model's
    own logits at every row's positions). Rows as wide as these may also split (see below); here
    a high per-forward cost keeps them in one, so cached and in-row rows share it."""
    from attncache.tiers import rows as rows_module

    monkeypatch.setattr(rows_module, "FORWARD_TOKENS", 10_000)
    model = tiny_model("llama")
    a, b = random_seqs(2, lo=20, hi=26, seed=101)
    runner = PrefixTier(model, min_prefix=8)
    if not head:
        runner.head = None
    runner.run([a + [3]], 1, 0)  # a is in the tree
    loner = random_seqs(1, lo=11, hi=11, seed=102)[0]
    batch = [a + [4, 5, 6], b + [7], loner, b + [8, 9, 10, 11], a + [12]]
    with TokenCounter(model) as counter:
        got = runner.run(batch, 3, 0).logits
    for r, g, s in zip(exact_logits(model, batch, 3), got, batch, strict=True):
        n = min(3, len(s))
        assert (r[-n:] - g[-n:]).abs().max() < 1e-4
    assert counter.calls == 2


def test_each_input_reuses_all_but_the_positions_it_needs():
    """Continuations of different lengths on one prompt: each needs the logits of its own tokens
    only, so all of them reuse the whole prompt (not trimmed by the longest continuation)."""
    model = tiny_model("llama")
    prompt = random_seqs(1, lo=30, hi=30, seed=103)[0]
    conts = [[3], [4, 5, 6, 7, 8, 9, 10, 11], [12, 13]]
    batch = [prompt + c for c in conts]
    needs = [len(c) + 1 for c in conts]  # the logits predicting each continuation token
    runner = PrefixTier(model, min_prefix=8)
    got = runner.run(batch, max(needs), 0, TierOptions(needs=needs)).logits
    for r, g, n in zip(exact_logits(model, batch, max(needs)), got, needs, strict=True):
        assert (r[-n:] - g[-n:]).abs().max() < 1e-4
    # shared prefix: the prompt less the position predicting the first continuation token
    assert runner.stats.tokens_reused == 2 * (len(prompt) - 1)


@pytest.mark.parametrize("keep_kv", [True, False])
def test_an_in_row_prefix_enters_the_tree_only_when_a_later_input_needs_it(keep_kv):
    model = tiny_model("qwen2")
    prompt = random_seqs(1, lo=16, hi=16, seed=104)[0]
    batch = [prompt + [3, 4], prompt + [5]]
    runner = PrefixTier(model, min_prefix=8)
    shared = len(prompt) if keep_kv else 0  # what a later input shares with the batch's inputs
    runner.run(batch, 1, 0, TierOptions(insert=[shared, shared]))
    held = runner.tree.match(prompt, len(prompt)).length
    assert held == (len(prompt) if keep_kv else 0)
    if keep_kv:  # and a later input over it is exact
        later = [prompt + [6, 7]]
        got = runner.run(later, 1, 0).logits
        assert (exact_logits(model, later, 1)[0] - got[0]).abs().max() < 1e-4
        assert runner.stats.tokens_reused == 2 * len(prompt)  # the second member, the later one


def test_packed_mask_lets_a_suffix_see_its_prefix_and_itself_only():
    from attncache.tiers.packing import Block, Row, pack

    suffixes = [[5, 6], [7], [8, 9, 9]]
    rows = [Row(0, [Block([1, 2, 3], [0, 1])]), Row(4, [Block([], [2])])]
    p = pack(rows, suffixes, [1, 1, 2], 4, 0, "cpu")
    seen = p.mask(torch.float32)[:, 0] == 0  # [rows, W, P + W]
    width = 6  # row 0: 3 prefix tokens + 2 + 1
    assert p.ids.shape == (2, width) and p.ids[1].tolist() == [0, 0, 0, 8, 9, 9]
    assert p.positions[0].tolist() == [0, 1, 2, 3, 4, 3]  # each suffix restarts after the prefix
    assert p.positions[1, 3:].tolist() == [4, 5, 6]
    assert not seen[0, :, :4].any()  # row 0 has no cached prefix
    assert seen[0, 5, 4:].tolist() == [True, True, True, False, False, True]  # prefix + itself
    assert seen[1, 3, :4].all() and seen[1, 5, 7:].tolist() == [True, True, True]
    assert p.at == {0: (0, [4]), 1: (0, [5]), 2: (1, [4, 5])}


def test_a_block_behind_a_cached_prefix_sees_the_past_its_prefix_and_itself_only():
    from attncache.tiers.packing import Block, Row, pack

    suffixes = [[5], [6, 7], [8]]  # inputs 0, 1 share block prefix [1, 2]; input 2 alone
    rows = [Row(3, [Block([1, 2], [0, 1]), Block([], [2])])]
    p = pack(rows, suffixes, [1, 1, 1], 4, 0, "cpu")
    seen = p.mask(torch.float32)[0, 0] == 0  # [W, P + W]; W = 2 + 1 + 2 + 1
    assert p.positions[0].tolist() == [3, 4, 5, 5, 6, 3]  # the block's prefix follows the past
    past = [False, True, True, True]  # right-aligned: the row's 3 cached positions of 4
    assert all(seen[q, :4].tolist() == past for q in range(6))
    assert seen[0, 4:].tolist() == [True, False, False, False, False, False]
    assert seen[1, 4:].tolist() == [True, True, False, False, False, False]
    assert seen[4, 4:].tolist() == [True, True, False, True, True, False]  # prefix + itself
    assert seen[5, 4:].tolist() == [False, False, False, False, False, True]  # itself only
    assert p.prefix_at == {(0, 0): 0}


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "mistral_sliding", "qwen2_sliding"])
def test_choices_of_questions_behind_one_cached_header_compute_each_question_once(family):
    """A cached header, then per question its text, then its choices: each question's tokens run
    once (a block), not once per choice, and every output equals the uncached model's (sliding
    windows of 5-6 tokens included: the header and each question are longer)."""
    model = tiny_model(family)
    header = random_seqs(1, lo=24, hi=24, seed=300)[0]
    questions = random_seqs(3, lo=10, hi=14, seed=301)
    batch = [header + q + [40 + c] * (1 + c % 2) for q in questions for c in range(3)]
    runner = PrefixTier(model, min_prefix=8)
    runner.run([header + [9, 9]], 1, 0)  # the header enters the tree
    before = runner.stats.tokens_run
    got = runner.run(batch, 2, 0).logits
    for r, g in zip(exact_logits(model, batch, 2), got, strict=True):
        assert (r - g).abs().max() < 1e-4
    run = runner.stats.tokens_run - before
    # per question its text but the last token once (the last token's logits are needed: it
    # predicts the choice), per choice that token and its own
    choices = sum(1 + (1 + c % 2) for c in range(3))
    assert run == sum(len(q) - 1 + choices for q in questions)
    # and a later batch finds each question in the tree (its block was kept)
    later = [header + q + [50] for q in questions]
    got = runner.run(later, 1, 0).logits
    for r, g in zip(exact_logits(model, later, 1), got, strict=True):
        assert (r - g).abs().max() < 1e-4
    assert runner.stats.tokens_run - before - run == len(later)


def test_rows_of_very_different_widths_run_as_separate_forwards():
    from attncache.tiers.packing import split_rows

    assert split_rows([10, 12, 11], 48) == [[0, 2, 1]]  # little padding: one forward
    chunks = split_rows([20, 300, 22, 310], 48)  # two narrow, two wide rows
    assert sorted(map(sorted, chunks)) == [[0, 2], [1, 3]]
    assert sorted(r for c in split_rows([5, 9, 200, 7, 80], 16) for r in c) == [0, 1, 2, 3, 4]


def test_suffixes_over_one_prefix_fill_the_fewest_even_rows():
    from attncache.tiers.packing import balanced_rows

    rows = balanced_rows([40] * 14, 276)  # 560 tokens: 3 rows, not 276 + 276 + 8
    assert sorted(i for r in rows for i in r) == list(range(14))
    assert len(rows) == 3 and {len(r) for r in rows} <= {4, 5}
    assert balanced_rows([60, 60, 60], 100) == [[0], [1], [2]]  # two would exceed the cap
    assert sorted(balanced_rows([5, 300, 7], 100)) == [[0, 2], [1]]  # a long one alone
    assert balanced_rows([3, 4], 0) == [[0], [1]]  # no packing: a row each


def test_missing_prefixes_pack_side_by_side_into_few_rows():
    from attncache.tiers.packing import segment_rows

    rows = segment_rows([520, 309, 276], 1040)
    assert sorted(map(sorted, rows)) == [[0], [1, 2]]  # 2 x 585 padded tokens, not 3 x 520
    assert segment_rows([60] * 4, 120) == [[0], [1], [2], [3]]  # equal: no wider rows needed


def test_wide_groups_prefixes_run_in_one_packed_forward_and_exact(monkeypatch):
    """Three new prompts of different lengths, each with a group too wide for one row: their
    prefixes run in one forward, side by side, then the suffixes over them; all outputs equal the
    uncached model's (1e-4)."""
    from attncache.tiers import prefix as prefix_module
    from attncache.tiers import rows as rows_module

    monkeypatch.setattr(prefix_module, "IN_ROW_TOKENS", 0)  # every new group: prefix first
    monkeypatch.setattr(rows_module, "FORWARD_TOKENS", 10_000)  # suffixes in one forward
    model = tiny_model("qwen2")
    prompts = [random_seqs(1, lo=n, hi=n, seed=90 + n)[0] for n in (30, 17, 12)]
    batch = [p + [3 + k] * (1 + k) for p in prompts for k in range(3)]
    runner = PrefixTier(model, min_prefix=8)
    with TokenCounter(model) as counter:
        got = runner.run(batch, 1, 0).logits
    for r, g in zip(exact_logits(model, batch, 1), got, strict=True):
        assert (r - g).abs().max() < 1e-4
    assert counter.calls == 2  # the prefixes, then every suffix
    assert counter.shapes[0] == (2, 30)  # 30 | 17 + 12 side by side, not 3 rows padded to 30
    assert runner.stats.tokens_run == 30 + 17 + 12 + 3 * (1 + 2 + 3)
    assert all(runner.tree.match(p, len(p)).length == len(p) for p in prompts)


def test_prefixes_longer_than_the_side_by_side_width_run_one_per_row(monkeypatch):
    """Past SIDE_BY_SIDE_TOKENS two prefixes in one row cost more attention than the padding they
    save. 17 + 14 tokens fit a row only wider than the longest prompt (30): by default they share
    one (2 rows), with the width lowered to 20 each prompt runs in a row of its own, exact."""
    from attncache.tiers import prefix as prefix_module
    from attncache.tiers import rows as rows_module

    monkeypatch.setattr(prefix_module, "IN_ROW_TOKENS", 0)
    monkeypatch.setattr(rows_module, "FORWARD_TOKENS", 10_000)
    model = tiny_model("qwen2")
    prompts = [random_seqs(1, lo=n, hi=n, seed=90 + n)[0] for n in (30, 17, 14)]
    batch = [p + [3 + k] * (1 + k) for p in prompts for k in range(3)]
    for width, rows in ((rows_module.SIDE_BY_SIDE_TOKENS, 2), (20, 3)):
        monkeypatch.setattr(rows_module, "SIDE_BY_SIDE_TOKENS", width)
        runner = PrefixTier(model, min_prefix=8)
        with TokenCounter(model) as counter:
            got = runner.run(batch, 1, 0).logits
        for r, g in zip(exact_logits(model, batch, 1), got, strict=True):
            assert (r - g).abs().max() < 1e-4
        assert counter.shapes[0][0] == rows  # the prefixes' forward


def _distinct_prefixes(seqs):
    """Tokens a perfect prefix cache computes: one per distinct prefix of the inputs."""
    return len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})


@pytest.mark.parametrize("keep_kv", [True, False])
def test_an_input_that_reads_a_short_prefix_extends_the_tree_for_a_later_batch(keep_kv):
    # A header in the tree; then one input opening a long shared prompt that only the next batch
    # continues: with ``insert`` its own K/V go in behind the header, so the next batch reuses the
    # whole prompt instead of computing it again.
    model = tiny_model("llama")
    header, prompt = random_seqs(2, lo=10, hi=10, seed=60)
    head, first, later = random_seqs(3, lo=6, hi=6, seed=61)
    batches = [
        [header + head],
        [header + prompt + first],
        [header + prompt + later, header + prompt + first[:2] + later],
    ]
    runner = PrefixTier(model, min_prefix=8)
    runner.run(batches[0], 1, 0, TierOptions(insert=[len(header)]))
    runner.run(batches[1], 1, 0, TierOptions(insert=[len(header + prompt) if keep_kv else 0]))
    held = runner.tree.match(batches[1][0], len(batches[1][0])).length
    assert held == (len(batches[1][0]) if keep_kv else len(header))
    # a later input would share the prompt, which these inputs read whole: nothing more to keep
    shared = len(header + prompt)
    got = runner.run(batches[2], 1, 0, TierOptions(insert=[shared, shared])).logits
    for ref, g in zip(exact_logits(model, batches[2], 1), got, strict=True):
        assert (ref - g).abs().max() < 1e-4
    if keep_kv:  # the first read the prompt from the tree and added nothing behind it
        assert runner.tree.match(batches[2][0], len(batches[2][0])).length == shared
    seqs = [s for b in batches for s in b]
    if keep_kv:
        assert runner.stats.tokens_run == _distinct_prefixes(seqs)
    else:  # the prompt ran again for the later batch
        assert runner.stats.tokens_run >= _distinct_prefixes(seqs) + len(prompt)


def test_a_group_the_tree_holds_but_for_a_few_tokens_reuses_what_it_holds():
    # The tree holds a prompt; the next batch's inputs share it and two more tokens. Computing
    # those 2 tokens once, in a block over the held prompt, is cheaper than the 32-token prefix
    # again.
    model = tiny_model("qwen2")
    prompt = random_seqs(1, lo=30, hi=30, seed=62)[0]
    tails = random_seqs(3, lo=4, hi=7, seed=63)
    runner = PrefixTier(model, min_prefix=8)
    runner.run([prompt + [3]], 1, 0, TierOptions(insert=[len(prompt)]))
    batch = [prompt + [7, 7] + t for t in tails]
    got = runner.run(batch, 1, 0).logits
    for ref, g in zip(exact_logits(model, batch, 1), got, strict=True):
        assert (ref - g).abs().max() < 1e-4
    assert runner.stats.tokens_reused == 3 * len(prompt) + 2 * 2  # the 2 tokens, once
    assert runner.stats.tokens_run == len(prompt) + 1 + 2 + sum(len(t) for t in tails)


# --- sliding windows: every exact path against the uncached model, around the window's size


SLIDING = ["gemma3_text", "mistral_sliding", "qwen2_sliding"]


def test_mask_layout_names_each_familys_windows():
    from attncache.tiers.model_io import MaskLayout, mask_layout

    assert mask_layout(tiny_model("llama")) == MaskLayout()
    assert mask_layout(tiny_model("mistral")) == MaskLayout()  # sliding_window=None
    assert mask_layout(tiny_model("mistral_sliding")) == MaskLayout(5)  # every layer slides
    assert mask_layout(tiny_model("qwen2_sliding")) == MaskLayout(5, True)
    assert mask_layout(tiny_model("gemma3_text")) == MaskLayout(6, True)
    chunked = tiny_model("llama")
    chunked.config.layer_types = ["chunked_attention"] * 3  # a kind the tier cannot mask
    assert mask_layout(chunked) is None and not supports_prefix(chunked)
    with pytest.raises(Exception, match="cannot run"):
        PrefixTier(chunked)


def test_a_sliding_mask_hides_keys_a_window_or_more_before_the_query():
    from attncache.tiers.packing import Block, Row, pack

    suffixes = [[5, 6, 7], [8]]  # one row: 4 cached positions, block prefix [1, 2], two suffixes
    rows = [Row(4, [Block([1, 2], [0, 1])])]
    p = pack(rows, suffixes, [1, 1], 4, 0, "cpu")
    full = p.mask(torch.float32)[0, 0] == 0
    slid = p.mask(torch.float32, window=3)[0, 0] == 0
    assert p.positions[0].tolist() == [4, 5, 6, 7, 8, 6]
    assert p.key_positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 6]
    # the last suffix token (position 8) sees positions 6, 7, 8 of its own line only
    assert full[4].tolist() == [True] * 8 + [True, False]
    assert slid[4].tolist() == [False] * 6 + [True, True, True, False]
    # the second suffix (position 6) sees 4, 5 (the block prefix) and itself: not past 3
    assert slid[5].tolist() == [False] * 4 + [True, True] + [False] * 3 + [True]
    assert (slid <= full).all()  # a window only ever hides


@pytest.mark.parametrize("family", SLIDING)
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("prompt_len", [4, 6, 23])  # shorter than, equal to, longer than windows
def test_sliding_window_prefixes_are_exact(family, pack, prompt_len):
    """A prompt shorter than, as long as and far longer than the window: its continuations in one
    row (packed) or a row each, then in a later batch over the cached K/V, with ragged suffixes
    that run past the window; every output equals the uncached model's (1e-4)."""
    model = tiny_model(family)
    prompt = random_seqs(1, lo=prompt_len, hi=prompt_len, seed=91)[0]
    other = random_seqs(1, lo=12, hi=12, seed=92)[0]
    conts = [[3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13, 14, 15], [12, 13]]
    first = [prompt + c for c in conts] + [other]
    later = [prompt + [20 + k] * (2 + 3 * k) for k in range(4)] + [other + [1, 2, 3, 4, 5, 6, 7]]
    runner = PrefixTier(model, min_prefix=3, pack=pack)
    got = list(runner.run(first, 2, 0).logits) + list(runner.run(later, 2, 0).logits)
    for r, g in zip(exact_logits(model, first + later, 2), got, strict=True):
        assert (r - g).abs().max() < 1e-4
    assert runner.stats.items_with_prefix == len(conts) + len(later)
    assert runner.stats.tokens_reused > 0


def test_a_window_the_model_applies_is_followed_whatever_use_sliding_window_says():
    """Mistral-style models slide wherever ``sliding_window`` is set; a config that also carries
    ``use_sliding_window=False`` (a flag only Qwen-style configs read, and they clear the window
    themselves) still slides, so the tier masks as the model does."""
    model = tiny_model("mistral_sliding")
    model.config.use_sliding_window = False
    prompt = random_seqs(1, lo=23, hi=23, seed=91)[0]  # far past the 5-token window
    first = [prompt + c for c in ([3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13])]
    later = [prompt + [20 + k] * (2 + 3 * k) for k in range(3)]
    runner = PrefixTier(model, min_prefix=3)
    got = list(runner.run(first, 2, 0).logits) + list(runner.run(later, 2, 0).logits)
    for r, g in zip(exact_logits(model, first + later, 2), got, strict=True):
        assert (r - g).abs().max() < 1e-4
    assert runner.stats.tokens_reused > 0


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_missing_prefixes_side_by_side_are_exact(family):
    """New prompts longer than the window computed side by side in one forward (each attending
    to itself only), then their continuations over the cached K/V."""
    model = tiny_model(family)
    prompts = random_seqs(3, lo=15, hi=25, seed=95)
    wide = [p + [7 + k] for p in prompts for k in range(2)]
    runner = PrefixTier(model, min_prefix=4)
    got = runner.run(wide, 1, 0, TierOptions(insert=[len(s) for s in wide])).logits
    for r, g in zip(exact_logits(model, wide, 1), got, strict=True):
        assert (r - g).abs().max() < 1e-4
    assert runner.stats.tokens_reused > 0


def test_assign_prefixes_runs_new_groups_in_a_row_and_reads_held_ones_from_the_tree():
    from attncache.tiers.schedule import assign_prefixes

    p, q, r = list(range(1, 21)), list(range(30, 50)), list(range(60, 80))
    seqs = [p + [90], p + [91, 92], q + [93], q + [94], [5, 6, 7], r + [95], r + [96]]
    limits = [len(s) - 1 for s in seqs]
    # the tree holds all of q's group but 2 of its 20 shared tokens, and only 9 of r's: r's
    # members would recompute 2 x 11 tokens to read those 9, more than one row computing all 20
    tree = {tuple(q[:18]), tuple(r[:9])}

    def held(tokens, n):
        return max(
            (len(t) for t in tree if list(t) == list(tokens[: len(t)]) and len(t) <= n), default=0
        )

    got = assign_prefixes(seqs, limits, 8, held, in_row_tokens=64)
    assert got.in_row == [([0, 1], 20), ([5, 6], 20)]  # p: not held, fits a row; r too
    assert got.wanted[2:4] == [18, 18] and not got.missing  # q: reads the 18 held, runs 2 more
    assert got.wanted[4] == 0 and got.longest_shared == 20
    never = assign_prefixes(seqs, limits, 8, held, in_row_tokens=0)  # no packing
    assert not never.in_row and never.missing == {tuple(p), tuple(r)}
    assert never.wanted[:2] == [20, 20] and never.wanted[5:] == [20, 20]


def test_sharing_watch_idles_after_a_window_of_loners_and_re_arms_on_a_repeat():
    from attncache.tiers.schedule import SharingWatch

    watch = SharingWatch(head=2, window=3)
    for s in ([1, 2], [3, 4], [5]):  # [5] is shorter than the head: counted, never a repeat
        watch.observe([s])
        watch.settle()
    assert watch.idle
    watch.read_held()  # a held prefix read restarts the count but does not re-arm
    assert watch.idle
    watch.observe([[3, 4, 9]])  # repeats a recent head
    assert not watch.idle
    watch.observe([[7, 8], [7, 8, 1]])  # a repeat inside one batch
    watch.observe([[9, 9]])
    watch.settle()
    assert not watch.idle
