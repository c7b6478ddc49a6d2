"""How a batch of prefix/suffix rows becomes one forward's tensors (pure; no model, no tree).

A row is one line of the batch. It may attend to K/V the tree holds (``past``, in the cache region
in front of the new tokens); its new tokens are blocks. A block is the tokens its inputs share
beyond the past (``prefix``, computed once, in the row), then each input's own suffix. Every suffix
attends to the past, its block's prefix and itself only (a block mask), with position ids
restarting where the block's prefix ends, so one row answers several inputs and every shared token
is computed or read once per row: a few-shot header from the tree, then per question its context,
then its choices.

Layout of row ``r``, past region ``P`` wide and new-token region ``W`` wide, both right-aligned::

    [ 0 .. past_r | past K/V ][ pad .. | prefix | suffix 1 | suffix 2 | prefix | suffix 3 | ... ]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .schedule import prefix_groups, shared_prefix


@dataclass
class Block:
    """Inputs of a row sharing ``prefix`` beyond the row's past; ``insert``: keep the prefix's K/V
    in the tree (a later input shares it)."""

    prefix: list[int]
    items: list[int]
    insert: bool = False

    def width(self, suffixes: list[list[int]]) -> int:
        return len(self.prefix) + sum(len(suffixes[i]) for i in self.items)


@dataclass
class Row:
    past: int  # tokens of cached prefix K/V this row attends to (0: none)
    blocks: list[Block] = field(default_factory=list)

    def width(self, suffixes: list[list[int]]) -> int:
        return sum(b.width(suffixes) for b in self.blocks)

    @property
    def items(self) -> list[int]:
        return [i for b in self.blocks for i in b.items]


@dataclass
class Packed:
    ids: torch.Tensor  # [R, W]
    positions: torch.Tensor  # [R, W]
    allowed: torch.Tensor  # [R, W, P + W] on the CPU: which keys each new token may attend to
    key_positions: torch.Tensor  # [R, P + W] on the CPU: each key's position in its sequence
    at: dict[int, tuple[int, list[int]]]  # input -> (row, positions of its needed logits)
    keep: torch.Tensor  # every row's needed positions at once (``logits_to_keep`` for all rows)
    picks: dict[int, tuple[int, list[int]]]  # input -> (row, indices into ``keep``), oldest first
    prefix_at: dict[tuple[int, int], int]  # (row, block) -> start of its prefix in the new region
    suffix_at: dict[int, int]  # input -> start of its suffix in its row's new region

    def mask(self, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
        """The additive mask ``[R, 1, W, P + W]`` (0 or the dtype's min) on the ids' device;
        ``window``: a sliding layer's, which also hides keys ``window`` or more positions before
        the query (padding still sees itself: position 0 to 0)."""
        allowed = self.allowed
        if window is not None:
            gap = self.positions.cpu()[:, :, None] - self.key_positions[:, None, :]
            allowed = allowed & (gap < window)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)  # the CPU
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.unsqueeze(1).to(self.ids.device)


@dataclass
class Group:
    """Inputs sharing ``prefix``, not cached yet: one row, the prefix then every member's
    suffix; ``insert``: keep the prefix's K/V."""

    members: list[int]
    prefix: list[int]
    insert: bool


@dataclass
class RowPlan:
    rows: list[Row]
    sources: list[int | None]  # per row: an input whose cached prefix it reads (None: none)
    suffixes: list[list[int]]  # per input: the tokens it computes alone
    reused: list[int]  # per input: prefix tokens it did not compute (cached, or a block's)


def plan_rows(
    reads: list[tuple[int, int] | None],
    seqs: list[list[int]],
    groups: list[Group],
    limits: list[int],
    cap: int,
) -> RowPlan:
    """Rows of one suffix forward for inputs reading a cached prefix or in an in-row group.

    ``reads``: per input, the cached prefix it reads (a key and its length; None: none).
    Inputs reading the same one share rows: the prefix K/V is read once per row instead of once
    per input; among them, those sharing more tokens (a question's choices behind a shared
    header) form a block, those tokens computed once. They take as few rows as keep each within
    the prefix's length of new tokens (at least ``cap``: a packed row's attention grows with its
    whole width), filled evenly, so the rows of a forward pad little; ``cap`` 0: a row each.
    ``limits``: per input, the most leading tokens it may share (its needed positions stay its
    own). ``groups``: a row each."""
    count = len(seqs)
    plan = RowPlan([], [], [[] for _ in range(count)], [0] * count)
    readers: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(reads):
        if key is not None:
            readers.setdefault(key, []).append(i)
            plan.suffixes[i] = seqs[i][key[1] :]
            plan.reused[i] = key[1]
    for (_, length), items in readers.items():
        limit = max(cap, length) if cap else 0
        blocks = _blocks(plan, items, length, seqs, limits, limit)
        for members in balanced_rows([b.width(plan.suffixes) for b in blocks], limit):
            plan.rows.append(Row(length, [blocks[j] for j in members]))
            plan.sources.append(items[0])
    for g in groups:
        for k, i in enumerate(g.members):
            plan.suffixes[i] = seqs[i][len(g.prefix) :]
            plan.reused[i] = len(g.prefix) if k else 0  # the first member computes it
        plan.rows.append(Row(0, [Block(list(g.prefix), list(g.members), g.insert)]))
        plan.sources.append(None)
    return plan


def mark_kept(rows: list[Row], wanted: Callable[[int, int], bool]) -> set[int]:
    """Which K/V of rows over a cached past enter the tree. ``wanted(i, held)``: a later input
    shares more than ``held`` of input ``i``'s leading tokens. A block whose member is wanted past
    the row's past keeps its prefix (``block.insert``: a question behind its header); the inputs
    returned keep their own tokens behind what they share (one that read only a header opens a
    group the next batch continues)."""
    grow: set[int] = set()
    for row in rows:
        if not row.past:
            continue
        for block in row.blocks:
            if block.prefix and any(wanted(i, row.past) for i in block.items):
                block.insert = True
            grow.update(i for i in block.items if wanted(i, row.past + len(block.prefix)))
    return grow


def _blocks(
    plan: RowPlan, items: list[int], past: int, seqs: list[list[int]], limits: list[int], limit: int
) -> list[Block]:
    """Inputs reading one cached prefix as blocks: those sharing tokens beyond it (at most their
    ``limits``) one block each, when it fits a row (``limit``; 0: no packing, a block each);
    updates their ``plan.suffixes`` and ``plan.reused`` in place."""
    suffixes, reused = plan.suffixes, plan.reused
    if not limit:
        return [Block([], [i]) for i in items]
    blocks: list[Block] = []
    for g in prefix_groups([suffixes[i] for i in items], 1):
        members = [items[j] for j in g]
        extra = 0
        if len(members) > 1:
            extra = shared_prefix(suffixes, members)
            extra = min(extra, *(limits[i] - past for i in members))
        if extra < 1 or extra + sum(len(suffixes[i]) - extra for i in members) > limit:
            blocks.extend(Block([], [i]) for i in members)
            continue
        blocks.append(Block(suffixes[members[0]][:extra], members))
        for k, i in enumerate(members):
            suffixes[i] = seqs[i][past + extra :]
            reused[i] = past + (extra if k else 0)
    return blocks


def pack(
    rows: list[Row],
    suffixes: list[list[int]],
    needs: list[int],
    past_width: int,
    pad_id: int,
    device,
) -> Packed:
    """Tensors for one forward over ``rows``; input ``i`` needs its last ``needs[i]`` logits (all
    inside its suffix: callers leave those positions out of the prefix)."""
    count = len(rows)
    width = max(r.width(suffixes) for r in rows)
    cpu = torch.device("cpu")  # built here, then moved (whatever the default device is)
    ids = torch.full((count, width), pad_id, dtype=torch.long, device=cpu)
    pos = torch.zeros((count, width), dtype=torch.long, device=cpu)
    allowed = torch.zeros((count, width, past_width + width), dtype=torch.bool, device=cpu)
    past_pos = torch.zeros((count, past_width), dtype=torch.long, device=cpu)
    diag = torch.arange(width, device=cpu)
    allowed[:, diag, past_width + diag] = True  # padding attends to itself: no empty softmax row
    ends: dict[int, tuple[int, int]] = {}
    prefix_at: dict[tuple[int, int], int] = {}
    suffix_at: dict[int, int] = {}
    for r, row in enumerate(rows):
        start = width - row.width(suffixes)
        past = slice(past_width - row.past, past_width)  # empty when the row reads no K/V
        past_pos[r, past] = torch.arange(row.past, device=cpu)
        for b, block in enumerate(row.blocks):
            n = len(block.prefix)
            shared = slice(past_width + start, past_width + start + n)
            if n:
                prefix_at[r, b] = start
                ids[r, start : start + n] = torch.tensor(block.prefix, device=cpu)
                pos[r, start : start + n] = torch.arange(row.past, row.past + n, device=cpu)
                allowed[r, start : start + n, past] = True
                allowed[r, start : start + n, shared] = _causal(n)
                start += n
            p = row.past + n  # where every suffix's positions start
            for i in block.items:
                n = len(suffixes[i])
                seg = slice(start, start + n)
                ids[r, seg] = torch.tensor(suffixes[i], device=cpu)
                pos[r, seg] = torch.arange(p, p + n, device=cpu)
                allowed[r, seg, past] = True
                allowed[r, seg, shared] = True
                own = slice(past_width + start, past_width + start + n)
                allowed[r, seg, own] = _causal(n)
                ends[i] = (r, start + n)
                suffix_at[i] = start
                start += n
    wanted = sorted({e - k for i, (_, e) in ends.items() for k in range(needs[i], 0, -1)})
    where = {p: j for j, p in enumerate(wanted)}
    at = {i: (r, [e - k for k in range(needs[i], 0, -1)]) for i, (r, e) in ends.items()}
    picks = {i: (r, [where[p] for p in ps]) for i, (r, ps) in at.items()}
    return Packed(
        ids.to(device),
        pos.to(device),
        allowed,
        torch.cat([past_pos, pos], dim=1),
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
