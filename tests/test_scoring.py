"""Scoring states through the head in vocabulary chunks equals scoring whole logits; batches
waiting for the head come back in order, each with its own answers."""

import pytest
import torch

from attncache.tasks import scoring
from attncache.tasks.plan import Query
from attncache.tasks.scoring import Pending, score_logits, score_states

VOCAB, DIM = 1000, 16


def head(bias: bool, dtype=torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    h = torch.nn.Linear(DIM, VOCAB, bias=bias).to(dtype)
    with torch.no_grad():
        h.weight.mul_(8.0)
    return h


def items(sizes: list[int], seed: int = 1) -> tuple[list[torch.Tensor], list[list[Query]]]:
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(n, DIM, generator=g) for n in sizes]

    # every position queried, some twice; tokens at a chunk's first and last ids too
    def tokens(p: int) -> list[int]:
        return [int(torch.randint(0, VOCAB, (1,), generator=g)), (7 * p) % VOCAB]

    queries = [[Query(0, n - p, t) for p in range(n) for t in tokens(p)] for n in sizes]
    queries[0].append(Query(0, 1, 0))
    queries[-1].append(Query(0, 1, VOCAB - 1))
    return states, queries


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_floats", [1 << 23, 300 * 7])
def test_chunked_states_score_as_whole_logits(monkeypatch, bias, dtype, chunk_floats):
    monkeypatch.setattr(scoring, "CHUNK_FLOATS", chunk_floats)  # 2100 floats: chunks of 300 ids
    h = head(bias, dtype)
    states, queries = items([3, 1, 2, 1])
    states = [s.to(dtype) for s in states]
    got = score_states(h, states, queries, greedy=True)
    for s, qs, g in zip(states, queries, got, strict=True):
        ref = score_logits(h(s), qs, greedy=True)
        assert g.values == pytest.approx(ref.values, abs=1e-5)
        assert g.argmax == ref.argmax and g.greedy == ref.greedy


def test_argmax_ties_go_to_the_lowest_token_as_whole_argmax_does(monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_FLOATS", 256)  # one position: chunks of 256 ids
    h = torch.nn.Linear(DIM, VOCAB, bias=True)
    with torch.no_grad():
        h.weight.zero_()
        h.bias.zero_()
        h.bias[[300, 700, 999]] = 5.0  # a three-way tie across chunks
    (got,) = score_states(h, [torch.randn(1, DIM)], [[Query(0, 1, 700)]], greedy=False)
    assert got.argmax == 300 == int(h(torch.zeros(1, DIM))[0].argmax())


def test_waiting_batches_come_back_in_order_with_their_own_answers(monkeypatch):
    monkeypatch.setattr(scoring, "FLUSH_POSITIONS", 5)
    h = head(False)
    states, queries = items([2, 2, 1, 3])
    pending = Pending(h, greedy=False)
    # batch a: states; b: logits and states; c: states (5 positions wait: all three answered)
    assert pending.add(states[:1], queries[:1], [True], "a") == []
    assert pending.add([h(states[1]), states[2]], queries[1:3], [False, True], "b") == []
    ready = pending.add(states[3:], queries[3:], [True], "c")
    assert [name for name, _ in ready] == ["a", "b", "c"]
    flat = [s for _, scores in ready for s in scores]
    for s, st, qs in zip(flat, states, queries, strict=True):
        assert s.values == pytest.approx(score_logits(h(st), qs, False).values, abs=1e-5)
    assert pending.flush() == []
    # a batch of logits alone is answered at once, after what waited before it
    assert pending.add(states[:1], queries[:1], [True], "d") == []
    assert [n for n, _ in pending.add([h(states[0])], queries[:1], None, "e")] == ["d", "e"]
