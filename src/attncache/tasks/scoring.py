"""The log-probabilities a plan's queries ask for, from an item's logits or from its decoder
states through the output head.

A large vocabulary makes the head the one cost the tiers cannot share (gemma-3's 262,144 tokens:
a third of an ARC-Easy pass). Reading its weights once for the positions of many forwards, rather
than once per forward, roughly halves it, so states wait (``Pending``) and are scored together, in
vocabulary chunks: no ``[positions, V]`` logits tensor is ever whole. Everything is normalised in
float32 whatever the model's dtype; ``score_logits`` is the reference ``score_states`` equals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .plan import Query

# a chunk's logits hold at most this many floats (8 MiB: cache-sized), whatever the positions
CHUNK_FLOATS = 1 << 21
# states wait for this many positions before the head runs over them (a progress bar and the
# memo then lag by at most this much work)
FLUSH_POSITIONS = 512


@dataclass
class Scored:
    """One item's answers: its queries' log-probabilities, the greedy token after its last
    position, and (if asked) the greedy token at each queried position (``from_end`` ->)."""

    values: list[float]
    argmax: int
    greedy: dict[int, int] = field(default_factory=dict)


def score_logits(logits: torch.Tensor, queries: list[Query], greedy: bool) -> Scored:
    """From an item's logits ``[n, V]`` (its last ``n`` positions)."""
    x = logits.float()
    n = x.shape[0]
    at = [n - q.from_end for q in queries]
    values = []
    if at:
        lse = torch.logsumexp(x[at], dim=-1)
        values = (x[at, [q.token for q in queries]] - lse).tolist()
    top = x.argmax(dim=-1).tolist() if greedy else []
    return Scored(values, int(x[-1].argmax()), {n - k: t for k, t in enumerate(top)})


@torch.no_grad()
def score_states(
    head: nn.Linear, states: list[torch.Tensor], queries: list[list[Query]], greedy: bool
) -> list[Scored]:
    """From items' decoder states ``[n_i, d]`` through ``head``, all items in one pass over its
    weights, a chunk of the vocabulary at a time: a running log-sum-exp and argmax per position,
    and each query's logit taken from the chunk that holds its token. Ties in the argmax go to
    the lowest token id, as ``argmax`` over whole logits."""
    if not states:
        return []
    flat = torch.cat(states)
    dev = flat.device  # every tensor made here lives beside the states (never a default device)
    sizes = [s.shape[0] for s in states]
    starts = [0, *accumulate(sizes)][:-1]  # each item's first row in ``flat``
    pos = torch.tensor(
        [b + n - q.from_end for b, n, qs in zip(starts, sizes, queries, strict=True) for q in qs],
        dtype=torch.long,
        device=dev,
    )
    tok = torch.tensor([q.token for qs in queries for q in qs], dtype=torch.long, device=dev)
    count, vocab = flat.shape[0], head.weight.shape[0]
    chunk = max(256, min(vocab, CHUNK_FLOATS // max(1, count)))
    run_max = torch.full((count,), float("-inf"), device=dev)
    run_sum = torch.zeros(count, device=dev)
    best = torch.zeros(count, dtype=torch.long, device=dev)
    picked = torch.zeros(len(tok), device=dev)
    for lo in range(0, vocab, chunk):
        bias = head.bias[lo : lo + chunk] if head.bias is not None else None
        x = F.linear(flat, head.weight[lo : lo + chunk], bias).float()
        top, arg = x.max(dim=-1)
        best = torch.where(top > run_max, arg + lo, best)  # strict: the earlier chunk keeps ties
        new_max = torch.maximum(run_max, top)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(x - new_max[:, None]).sum(-1)
        run_max = new_max
        here = (tok >= lo) & (tok < lo + x.shape[1])
        if here.any():
            picked[here] = x[pos[here], tok[here] - lo]
    values = (picked - (run_max + run_sum.log())[pos]).tolist()
    best_list = best.tolist()
    out, k = [], 0
    for b, n, qs in zip(starts, sizes, queries, strict=True):
        top = {n - j: best_list[b + j] for j in range(n)} if greedy else {}
        last = best_list[b + n - 1] if n else -1  # -1: no position (never a neighbour's)
        out.append(Scored(values[k : k + len(qs)], last, top))
        k += len(qs)
    return out


@dataclass
class _Waiting:
    items: list[torch.Tensor | None]  # per item its states, None once scored
    queries: list[list[Query]]
    scored: list[Scored | None]
    batch: Any  # the caller's own record of the batch, handed back with its answers


class Pending:
    """Batches whose answers wait for the head: logits are scored on arrival, states once
    ``FLUSH_POSITIONS`` of them wait (or at ``flush``). ``add`` and ``flush`` return the batches
    that are answered, in the order they came, each with its answers in item order."""

    def __init__(self, head: nn.Linear | None, greedy: bool):
        self.head, self.greedy = head, greedy
        self._waiting: list[_Waiting] = []
        self._positions = 0

    def add(
        self,
        tensors: list[torch.Tensor],
        queries: list[list[Query]],
        states: list[bool] | None,
        batch: Any,
    ) -> list[tuple[Any, list[Scored]]]:
        states = states or [False] * len(tensors)
        scored = [
            None if s else score_logits(t, qs, self.greedy)
            for t, qs, s in zip(tensors, queries, states, strict=True)
        ]
        items = [t if s else None for t, s in zip(tensors, states, strict=True)]
        self._waiting.append(_Waiting(items, queries, scored, batch))
        self._positions += sum(t.shape[0] for t in items if t is not None)
        if self._positions >= FLUSH_POSITIONS or not any(states):
            return self.flush()
        return []

    def flush(self) -> list[tuple[Any, list[Scored]]]:
        todo = [(w, j) for w in self._waiting for j, t in enumerate(w.items) if t is not None]
        if todo:
            if self.head is None:
                raise ValueError("decoder states came back but there is no head to score them")
            got = score_states(
                self.head, [w.items[j] for w, j in todo], [w.queries[j] for w, j in todo],
                self.greedy,
            )  # fmt: skip
            for (w, j), s in zip(todo, got, strict=True):
                w.scored[j], w.items[j] = s, None
        waiting, self._waiting, self._positions = self._waiting, [], 0
        return [(w.batch, [s for s in w.scored if s is not None]) for w in waiting]
