"""How a batch of prefix/suffix rows becomes one forward's tensors (pure; no model, no tree).

A row is one line of the batch. It attends to one prefix, either K/V the tree holds (``past``, in
the cache region in front of the new tokens) or tokens computed in this very row (``prefix``, at
the start of the row), followed by the suffixes of the inputs that share it. Every suffix attends
to the prefix and to itself only (a block mask), with position ids restarting where the prefix
ends, so one row answers several inputs and the prefix is computed or read once per row.

Layout of row ``r``, past region ``P`` wide and new-token region ``W`` wide, both right-aligned::

    [ 0 .. past_r | past K/V ][ pad .. | prefix | suffix 1 | suffix 2 | ... ]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Row:
    past: int  # tokens of cached prefix K/V this row attends to (0: none)
    prefix: list[int]  # prefix tokens computed in this row ([] when the prefix is cached)
    items: list[int] = field(default_factory=list)  # inputs whose suffixes share the row
    insert: bool = False  # keep the in-row prefix's K/V in the tree (a later input shares it)

    def width(self, suffixes: list[list[int]]) -> int:
        return len(self.prefix) + sum(len(suffixes[i]) for i in self.items)


@dataclass
class Packed:
    ids: torch.Tensor  # [R, W]
    positions: torch.Tensor  # [R, W]
    mask: torch.Tensor  # [R, 1, W, P + W] additive (0 or the dtype's min)
    at: dict[int, tuple[int, list[int]]]  # input -> (row, positions of its needed logits)
    keep: torch.Tensor  # every row's needed positions at once (``logits_to_keep`` for all rows)
    picks: dict[int, tuple[int, list[int]]]  # input -> (row, indices into ``keep``), oldest first
    prefix_at: dict[int, int]  # row -> start of its in-row prefix in the new region
    suffix_at: dict[int, int]  # input -> start of its suffix in its row's new region


def plan_rows(
    reads: list[tuple[int, int] | None],
    suffixes: list[list[int]],
    groups: list[tuple[list[int], list[int], bool]],
    cap: int,
) -> tuple[list[Row], list[int | None]]:
    """Rows of one suffix forward, and per row an input whose cached prefix it reads (None: the
    row computes its own prefix).

    ``reads``: per input, the cached prefix it reads (a key and its length; None: none).
    Inputs reading the same one share rows: the prefix K/V is read once per row instead of once
    per input. They take as few rows as keep each within the prefix's length of suffix tokens (at
    least ``cap``: a packed row's attention grows with its whole width), filled evenly, so the
    rows of a forward pad little; ``cap`` 0: a row each. ``groups``: inputs sharing a prefix not
    cached yet (members, the prefix tokens, whether to keep its K/V): a row each, the prefix
    tokens then every member's suffix."""
    readers: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(reads):
        if key is not None:
            readers.setdefault(key, []).append(i)
    rows: list[Row] = []
    sources: list[int | None] = []
    for (_, length), items in readers.items():
        limit = max(cap, length) if cap else 0
        for members in balanced_rows([len(suffixes[i]) for i in items], limit):
            rows.append(Row(length, [], [items[j] for j in members]))
            sources.append(items[0])
    for members, prefix, keep in groups:
        rows.append(Row(0, list(prefix), list(members), insert=keep))
        sources.append(None)
    return rows, sources


def pack(
    rows: list[Row],
    suffixes: list[list[int]],
    needs: list[int],
    past_width: int,
    pad_id: int,
    device,
    dtype: torch.dtype,
) -> Packed:
    """Tensors for one forward over ``rows``; input ``i`` needs its last ``needs[i]`` logits (all
    inside its suffix: callers leave those positions out of the prefix)."""
    count = len(rows)
    width = max(r.width(suffixes) for r in rows)
    cpu = torch.device("cpu")  # built here, then moved (whatever the default device is)
    ids = torch.full((count, width), pad_id, dtype=torch.long, device=cpu)
    pos = torch.zeros((count, width), dtype=torch.long, device=cpu)
    allowed = torch.zeros((count, width, past_width + width), dtype=torch.bool, device=cpu)
    diag = torch.arange(width, device=cpu)
    allowed[:, diag, past_width + diag] = True  # padding attends to itself: no empty softmax row
    ends: dict[int, tuple[int, int]] = {}
    prefix_at: dict[int, int] = {}
    suffix_at: dict[int, int] = {}
    for r, row in enumerate(rows):
        start = width - row.width(suffixes)
        p = row.past + len(row.prefix)  # where every suffix's positions start
        if row.past:
            seen = slice(past_width - row.past, past_width)
        else:
            seen = slice(past_width + start, past_width + start + len(row.prefix))
        if row.prefix:
            n = len(row.prefix)
            prefix_at[r] = start
            ids[r, start : start + n] = torch.tensor(row.prefix, device=cpu)
            pos[r, start : start + n] = torch.arange(n, device=cpu)
            allowed[r, start : start + n, seen] = _causal(n)
            start += n
        for i in row.items:
            n = len(suffixes[i])
            seg = slice(start, start + n)
            ids[r, seg] = torch.tensor(suffixes[i], device=cpu)
            pos[r, seg] = torch.arange(p, p + n, device=cpu)
            allowed[r, seg, seen] = True
            own = slice(past_width + start, past_width + start + n)
            allowed[r, seg, own] = _causal(n)
            ends[i] = (r, start + n)
            suffix_at[i] = start
            start += n
    mask = torch.zeros(allowed.shape, dtype=dtype, device=cpu)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    wanted = sorted({e - k for i, (_, e) in ends.items() for k in range(needs[i], 0, -1)})
    where = {p: j for j, p in enumerate(wanted)}
    at = {i: (r, [e - k for k in range(needs[i], 0, -1)]) for i, (r, e) in ends.items()}
    picks = {i: (r, [where[p] for p in ps]) for i, (r, ps) in at.items()}
    return Packed(
        ids.to(device),
        pos.to(device),
        mask.unsqueeze(1).to(device),
        at,
        torch.tensor(wanted, device=device),
        picks,
        prefix_at,
        suffix_at,
    )


def _causal(n: int) -> torch.Tensor:
    return torch.ones((n, n), dtype=torch.bool, device="cpu").tril()


def split_rows(widths: list[int], overhead: int) -> list[list[int]]:
    """Rows (by index) grouped into forwards so that padding and per-forward cost are least.

    A forward costs ``overhead`` (its fixed cost, in tokens of work) plus its rows times its
    widest row. Sorted by width, the best split is contiguous: a small dynamic program over cut
    points finds it."""
    order = sorted(range(len(widths)), key=lambda r: widths[r])
    w = [widths[r] for r in order]
    best = [0.0] + [float("inf")] * len(w)  # best[k]: cost of the first k rows
    cut = [0] * (len(w) + 1)
    for k in range(1, len(w) + 1):
        for j in range(k):  # rows j..k-1 in one forward, as wide as row k-1
            cost = best[j] + overhead + (k - j) * w[k - 1]
            if cost < best[k]:
                best[k], cut[k] = cost, j
    chunks, k = [], len(w)
    while k:
        chunks.append(order[cut[k] : k])
        k = cut[k]
    return chunks[::-1]


def segment_rows(lengths: list[int], widest: int) -> list[list[int]]:
    """Sequences (by index) packed side by side into rows, each sequence attending to itself only
    (``pack`` with an empty prefix), so that rows x width, the padded tokens a forward runs, is
    least. Widths from the longest sequence up to ``widest`` are tried (first fit, longest
    first); the narrowest best wins, a row's attention growing with its width."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest = lengths[order[0]]
    best: tuple[int, list[list[int]]] | None = None
    for width in range(longest, max(longest, widest) + 1, 16):
        rows: list[list[int]] = []
        room: list[int] = []
        for i in order:
            r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
            if r is None:
                rows.append([])
                room.append(width)
                r = len(rows) - 1
            rows[r].append(i)
            room[r] -= lengths[i]
        used = len(rows) * max(width - min(room), 1)  # a forward is as wide as its widest row
        if best is None or used < best[0]:
            best = (used, rows)
    assert best is not None
    return best[1]


def balanced_rows(lengths: list[int], cap: int) -> list[list[int]]:
    """Suffixes (by index) in as few rows as keep every row within ``cap`` tokens (a suffix longer
    than ``cap`` has a row to itself), filled evenly: longest first, each into the emptiest row.
    ``cap`` 0: a row each."""
    if cap <= 0:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    long = [n for n in lengths if n > cap]
    count = max(1, len(long) + -(-(sum(lengths) - sum(long)) // cap))
    while True:
        rows: list[list[int]] = [[] for _ in range(count)]
        fill = [0] * count
        for i in order:
            r = min(range(count), key=fill.__getitem__)
            rows[r].append(i)
            fill[r] += lengths[i]
        if count >= len(lengths) or all(f <= cap or len(r) == 1 for f, r in zip(fill, rows)):
            return [sorted(r) for r in rows if r]
        count += 1
