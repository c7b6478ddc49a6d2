"""Which sequences share a forward: groups by shared prefix first, length second (pure functions).

Sorted lexicographically, sequences that share a prefix are neighbours, and the longest prefix that
a run of neighbours shares is the smallest common prefix of adjacent pairs. So one sort finds every
group of inputs sharing at least ``min_prefix`` tokens (a few-shot prompt, one prompt's choices);
inside a group inputs are ordered by length so padded suffixes waste little.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# a batch sized by tokens holds at most this many times ``batch_size`` inputs (the logits it
# returns, and the Python work per input, grow with its inputs)
MAX_INPUTS_FACTOR = 4


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def prefix_groups(seqs: Sequence[Sequence[int]], min_prefix: int) -> list[list[int]]:
    """Indices grouped so that every group of two or more shares >= ``min_prefix`` tokens; the other
    inputs come as groups of one. Groups keep the order of their first member.

    Prefixes nest (one instruction header, then per subject its few-shot prompt), so the grouping
    is chosen on the tree the sorted order implies: a run of neighbours is split where adjacent
    inputs share least whenever its parts save more tokens, counted as (members - 1) x shared
    prefix per group, than the run as one group does."""
    if not seqs:
        return []
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    lcp = [common_prefix(seqs[a], seqs[b]) for a, b in zip(order, order[1:], strict=False)]
    best: dict[tuple[int, int], tuple[int, list[list[int]]]] = {}
    stack = [(0, len(order), False)]
    while stack:  # post-order over runs [lo, hi) of the sorted order, without recursion
        lo, hi, ready = stack.pop()
        if hi - lo == 1:
            best[lo, hi] = (0, [[order[lo]]])
            continue
        shared = min(lcp[lo : hi - 1])
        cuts = [k + 1 for k in range(lo, hi - 1) if lcp[k] == shared]
        parts = list(zip([lo, *cuts], [*cuts, hi], strict=True))
        if not ready:
            stack.append((lo, hi, True))
            stack.extend((a, b, False) for a, b in parts)
            continue
        saving = sum(best[p][0] for p in parts)
        whole = (hi - lo - 1) * shared
        if shared < min_prefix or saving > whole:
            best[lo, hi] = (saving, [g for p in parts for g in best[p][1]])
        else:
            best[lo, hi] = (whole, [order[lo:hi]])
    return sorted(best[0, len(order)][1], key=min)


def shared_prefix(seqs: Sequence[Sequence[int]], members: list[int]) -> int:
    """Tokens every member shares."""
    first = seqs[members[0]]
    return min((common_prefix(first, seqs[i]) for i in members[1:]), default=len(first))


def prefix_batches(
    seqs: Sequence[Sequence[int]],
    batch_size: int,
    min_prefix: int,
    groups: list[list[int]] | None = None,
    reusable: list[int] | None = None,
) -> list[list[int]]:
    """Batches of indices: groups sharing a prefix first (smaller groups first, each by length),
    then the rest by length. ``groups``: ``prefix_groups(seqs, min_prefix)`` if already known.

    ``reusable``: per group, the prefix tokens its members after the first take from the tier.
    Given it, a batch is sized by the tokens it will run, not by its inputs: it takes inputs
    until it runs as many tokens as ``batch_size`` average inputs hold (what a plain batch runs),
    and at most ``MAX_INPUTS_FACTOR`` x ``batch_size`` inputs. Without it, ``batch_size`` inputs."""
    groups = prefix_groups(seqs, min_prefix) if groups is None else groups
    saved = [0] * len(groups) if reusable is None else reusable
    shared = [
        (sorted(g, key=lambda i: len(seqs[i])), r)
        for g, r in zip(groups, saved, strict=True)
        if len(g) > 1
    ]
    # groups of similar size side by side: a one-row group's row is as wide as the group, so this
    # keeps the rows of a forward alike (little padding)
    shared.sort(key=lambda gr: sum(len(seqs[i]) for i in gr[0]))
    alone = sorted((g[0] for g in groups if len(g) == 1), key=lambda i: len(seqs[i]))
    flat = [i for g, _ in shared for i in g] + alone
    if reusable is None or not seqs:
        return [flat[k : k + batch_size] for k in range(0, len(flat), batch_size)]
    # tokens each input makes the tier run: a group's first member its whole sequence (the shared
    # prefix once), every later member its suffix
    cost = {i: len(seqs[i]) - (r if k else 0) for g, r in shared for k, i in enumerate(g)}
    cost.update({i: len(seqs[i]) for i in alone})
    budget = batch_size * sum(len(s) for s in seqs) / len(seqs)
    most = MAX_INPUTS_FACTOR * batch_size
    batches: list[list[int]] = [[]]
    tokens = 0
    for i in flat:
        if batches[-1] and (tokens + cost[i] > budget or len(batches[-1]) >= most):
            batches.append([])
            tokens = 0
        batches[-1].append(i)
        tokens += cost[i]
    return batches


@dataclass
class Assignment:
    """How the inputs of one batch get their prefixes (``assign_prefixes``)."""

    wanted: list[int]  # per input: the prefix tokens it must take from the tree (0: any match)
    in_row: list[tuple[list[int], int]]  # groups run as one row: members, prefix length
    missing: set[tuple[int, ...]]  # prefixes to compute into the tree before the batch runs
    longest_shared: int  # the longest prefix a group shared


def assign_prefixes(
    seqs: Sequence[Sequence[int]],
    limits: Sequence[int],
    min_prefix: int,
    held: Callable[[Sequence[int], int], int],
    in_row_tokens: int,
) -> Assignment:
    """Per group of inputs sharing at least ``min_prefix`` tokens (each input reusing at most
    ``limits[i]``): run as one row (the prefix, then every member's suffix) when its prefix is
    not held and the row fits ``in_row_tokens`` (0: never), else read the prefix from the tree,
    computed first if missing. ``held(tokens, n)``: how many of the first ``n`` tokens the tree
    holds. Where the tree holds all but a few of a group's tokens (a group split across batches
    whose new members share a little more), the group reads what is held and runs those few
    tokens in every suffix, not the prefix again."""
    out = Assignment([0] * len(seqs), [], set(), 0)
    for members in prefix_groups(seqs, min_prefix):
        if len(members) < 2:
            continue
        shared = min(shared_prefix(seqs, members), *(limits[i] for i in members))
        out.longest_shared = max(out.longest_shared, shared)
        if shared < min_prefix:
            continue
        have = held(seqs[members[0]], shared)
        if min_prefix <= have < shared and len(members) * (shared - have) < shared:
            shared = have
        cached = have >= shared
        width = shared + sum(len(seqs[i]) - shared for i in members)
        if not cached and width <= in_row_tokens:
            out.in_row.append((members, shared))
            continue
        for i in members:
            out.wanted[i] = shared
        if not cached:
            out.missing.add(tuple(seqs[members[0]][:shared]))
    return out


class SharingWatch:
    """The idle rule of a prefix tier: idle once the last ``window`` inputs shared not even their
    first ``head`` tokens with another; re-armed by an input whose first ``head`` tokens repeat a
    recent input's (or another's in its batch). A batch that read a held prefix restarts the count
    (``read_held``) but does not re-arm an idle tier."""

    def __init__(self, head: int, window: int):
        self.head = head
        self.window = window
        self.idle = False
        self._recent: deque[tuple[int, ...]] = deque(maxlen=window)
        self._since_shared = 0  # inputs since one last shared ``head`` tokens with another

    def observe(self, seqs: Sequence[Sequence[int]]) -> None:
        heads = [tuple(s[: self.head]) for s in seqs if len(s) >= self.head]
        seen = set(self._recent)
        repeats = len(set(heads)) < len(heads) or any(h in seen for h in heads)
        self._recent.extend(heads)
        if repeats:
            self._since_shared = 0
            self.idle = False
        else:
            self._since_shared += len(seqs)

    def read_held(self) -> None:
        """Something was shared after all: a batch read a prefix the tree holds."""
        self._since_shared = 0

    def settle(self) -> None:
        """Go idle once ``window`` inputs in a row shared nothing (after a batch's matching)."""
        if self._since_shared >= self.window:
            self.idle = True
