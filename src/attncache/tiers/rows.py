"""The prefix tier's packed forwards over its tree (``prefix.py`` decides who runs where).

``ensure`` computes missing prefixes side by side, each row attending to itself only; ``run`` runs
every input that reads a prefix (cached, or computed in its group's row) in rows over the cached
K/V, a block mask keeping each suffix to its past, its block's prefix and itself (``packing.py``),
and keeps in the tree the K/V a later input shares. Where the head is separable the forwards stop
at the decoder and return its states at the needed positions, for the caller to put through the
head once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..stats import Counters
from .kept import NumericsTree
from .model_io import (
    CACHE_KW,
    MaskLayout,
    attention_mask,
    empty_cache,
    output_cache,
    span_kv,
    stacked_cache,
)
from .packing import (
    Block,
    Group,
    Packed,
    Row,
    mark_kept,
    pack,
    plan_rows,
    segment_rows,
    split_rows,
)
from .radix import Match, RadixKV

# a packed row may always hold this many suffix tokens, however short its prefix
PACK_MIN_TOKENS = 32
# missing prefixes run side by side in rows up to this wide (or one per row, when longer): a row's
# attention grows with the square of its width, so two long prefixes in one row cost more (~25 % at
# 1200 tokens each, measured) than the padding they save
SIDE_BY_SIDE_TOKENS = 1024
# a forward's fixed cost in tokens of work (the weights are read once per forward): rows of very
# different widths run as separate forwards when the padding saved is worth more than this
FORWARD_TOKENS = 48


@dataclass
class TierBatch:
    """One ``PrefixTier.run``'s inputs as every step of it reads them."""

    seqs: list[list[int]]
    needs: list[int]  # per input: how many of its last positions' logits the caller reads
    pad_id: int
    insert: list[int] | None  # per input: leading tokens a later input shares (None: unknown)
    keeping: bool = True  # False while the tier idles: nothing new enters the tree

    @property
    def limits(self) -> list[int]:
        """Per input: the most leading tokens it may take from elsewhere."""
        return [max(0, len(s) - n) for s, n in zip(self.seqs, self.needs, strict=True)]


@dataclass
class RowModel:
    """What a packed forward runs: the model, how its layers mask, its separable head (None: the
    model's own forward computes logits)."""

    model: nn.Module
    layout: MaskLayout
    head: nn.Module | None


class RowRunner:
    """Packed forwards over ``kept``'s tree; counts tokens run and reused in ``stats``."""

    def __init__(self, target: RowModel, kept: NumericsTree, stats: Counters, packed: bool):
        self.target = target
        self.kept = kept
        self.stats = stats
        self.packed = packed  # inputs on one prefix share a row (a block mask); False: a row each

    @property
    def tree(self) -> RadixKV:
        return self.kept.tree

    def ensure(self, prefixes: set[tuple[int, ...]]) -> None:
        """Make the tree hold every prefix: compute the missing ones in one forward, packed side
        by side in rows (each attending to itself only), so prefixes of different lengths pad
        little."""
        todo = [list(p) for p in prefixes if self.tree.match(list(p), len(p)).length < len(p)]
        if not todo:
            return
        # Computed whole: simpler than resuming each from its partial match, and the common case
        # (a new few-shot prompt, a new question) has no partial match worth resuming.
        lengths = [len(p) for p in todo]
        longest = max(lengths)
        widest = max(longest, min(2 * longest, SIDE_BY_SIDE_TOKENS))
        rows = [Row(0, [Block([], r)]) for r in segment_rows(lengths, widest)]
        packed = pack(rows, todo, [0] * len(todo), 0, 0, self.kept.device)
        res = self._forward(packed, use_cache=True)
        self.stats.add(tokens_run=sum(lengths))
        t0 = time.perf_counter()
        cache = output_cache(res)
        for r, row in enumerate(rows):
            for i in row.items:
                self.tree.insert(todo[i], span_kv(cache, r, packed.suffix_at[i], lengths[i]))
        self.stats.add(insert_s=time.perf_counter() - t0)

    def _forward(self, packed: Packed, keep: torch.Tensor | int = 1, **kw):
        """The decoder alone where the head is separable (the caller applies it where needed),
        else the model with logits at ``keep``."""
        model, head = self.target.model, self.target.head
        dtype = next(model.parameters()).dtype
        args = {
            "input_ids": packed.ids,
            "attention_mask": attention_mask(packed, self.target.layout, dtype),
            "position_ids": packed.positions,
            **kw,
        }
        if kw.get("use_cache") and CACHE_KW not in kw:
            args[CACHE_KW] = empty_cache()
        if head is not None:
            return model.get_decoder()(**args)
        return model(**args, logits_to_keep=keep)

    def run(
        self,
        batch: TierBatch,
        matches: list[Match | None],
        in_row: list[tuple[list[int], int]],
        tokens: list[int],
    ) -> dict[int, torch.Tensor]:
        """Every input with a prefix (cached, or computed in its group's row) in one forward, or
        a few when rows of very different widths would pad much; per input its last ``needs[i]``
        logits ``[needs[i], V]`` (decoder states ``[needs[i], d]`` where the head is separable);
        ``tokens[i]`` set to the prefix tokens it did not compute.

        K/V worth keeping enter the tree (``packing.mark_kept``; ``insert``: per input, the
        leading tokens a later input shares; None: unknown, keep what is computed)."""

        seqs, insert = batch.seqs, batch.insert

        def wanted(i: int, held: int) -> bool:
            return batch.keeping and (insert is None or insert[i] > held)

        reads = [(id(m.node), m.length) if m is not None else None for m in matches]
        groups = [
            Group(g, seqs[g[0]][:p], insert is None or any(insert[i] > 0 for i in g))
            for g, p in in_row
        ]
        plan = plan_rows(reads, seqs, groups, batch.limits, PACK_MIN_TOKENS if self.packed else 0)
        for i in (i for row in plan.rows for i in row.items):
            tokens[i] = plan.reused[i]
        grow = mark_kept(plan.rows, wanted)
        widths = [r.width(plan.suffixes) for r in plan.rows]
        self.stats.add(
            items_with_prefix=sum(len(r.items) for r in plan.rows),
            tokens_reused=sum(plan.reused),
            tokens_run=sum(widths),
        )
        sources = [matches[i] if i is not None else None for i in plan.sources]
        got: dict[int, torch.Tensor] = {}
        for chunk in split_rows(widths, FORWARD_TOKENS):
            rows = [plan.rows[r] for r in chunk]
            srcs = [sources[r] for r in chunk]
            got.update(self._forward_rows(batch, rows, srcs, plan.suffixes, grow))
        return got

    def _forward_rows(
        self,
        batch: TierBatch,
        rows: list[Row],
        sources: list[Match | None],
        suffixes: list[list[int]],
        grow: set[int],
    ) -> dict[int, torch.Tensor]:
        """One forward over ``rows``; inserts the block prefixes marked ``insert`` (behind the
        row's past), then the inputs in ``grow`` (behind what they share)."""
        past_width = max(r.past for r in rows)
        packed = pack(rows, suffixes, batch.needs, past_width, batch.pad_id, self.kept.device)
        seqs = batch.seqs
        kw = {}
        if past_width:
            same = all(m is not None for m in sources) and (
                len({(id(m.node), m.length) for m in sources}) == 1
            )
            kvs = [m.kv() if m is not None else None for m in sources]
            kw[CACHE_KW] = stacked_cache(kvs, past_width, same)
        blocks = [(r, b) for (r, b) in sorted(packed.prefix_at) if rows[r].blocks[b].insert]
        grown = [
            (r, len(block.prefix), i)
            for r, row in enumerate(rows)
            for block in row.blocks
            for i in block.items
            if i in grow
        ]
        use_cache = bool(past_width or blocks or grown)
        res = self._forward(packed, keep=packed.keep, use_cache=use_cache, **kw)
        if self.target.head is not None:  # the decoder's states at the needed positions
            got = {i: res.last_hidden_state[r, ps] for i, (r, ps) in packed.at.items()}
        else:  # logits at the union of every row's positions, then each input's picked
            got = {i: res.logits[r, idx] for i, (r, idx) in packed.picks.items()}
        if blocks or grown:
            t0 = time.perf_counter()
            cache = output_cache(res)
            for r, b in blocks:  # before the inputs that extend them
                block, past = rows[r].blocks[b], rows[r].past
                kv = span_kv(cache, r, past_width + packed.prefix_at[r, b], len(block.prefix))
                self.tree.insert(seqs[block.items[0]][: past + len(block.prefix)], kv, start=past)
            for r, shared, i in grown:
                kv = span_kv(cache, r, past_width + packed.suffix_at[i], len(suffixes[i]))
                self.tree.insert(seqs[i], kv, start=rows[r].past + shared)
            self.stats.add(insert_s=time.perf_counter() - t0)
        return got
