"""Tier 1 for decoders: compute shared prefixes once, answer their suffixes in one forward. Exact.

With causal attention every hidden state of a prefix depends only on the prefix, so its keys and
values can be reused *exactly*: only the remaining tokens run, attending to the prefix. Per batch,
``PrefixTier.run``:

1. finds the inputs of the batch that share at least ``min_prefix`` tokens (``schedule.py``); each
   may reuse all of its prefix but the positions whose logits it needs (``needs``);
2. a group whose prefix is not cached and fits in one row runs as that row: the prefix, then every
   member's suffix (``packing.py``: a block mask, position ids restarting after the prefix); the
   prefixes of wider groups are computed first, side by side in one forward, into a radix tree
   (``radix.py``), unless the tree holds all but a few of a prefix's tokens (those few then run
   in every suffix);
3. every input whose prefix the tree holds runs its suffix over the cached K/V, in the fewest even
   rows per prefix; these rows and the one-row groups share a forward (or a few, when padding
   would cost more than a forward), logits only at the positions each input needs; readers of one
   cached prefix that share more tokens among themselves (the choices of one question behind a
   few-shot header) form a block: their common tokens run once, then each member's own tail; an
   input that a later one shares more with adds its own K/V to the tree behind the prefix it read;
4. the inputs without a usable prefix run together as usual, with the map cache (``maps``) applying
   to them, and insert their K/V when a later input may share it.

If the last 64 inputs shared not even ``min_prefix`` tokens with another (SST-2-like workloads),
the tier goes idle: it stops building K/V caches and inserting, so it costs about nothing where it
cannot help. It re-arms as soon as an input shares its first ``min_prefix`` tokens with one of the
last 64 (a server whose traffic changes reuses again).

Sliding-window layers (Mistral, Gemma 2/3, Qwen2 with windows) are exact too: the tree keeps every
position's K/V for every layer, and each packed forward hands the sliding layers a mask that also
hides keys a window or more before the query (``model_io.MaskLayout``), so a prefix longer than the
window, a suffix past it and a block row all see what the uncached model sees.

K/V depend on the numerics that computed them: the tree belongs to one ``models.numerics`` (a
model moved to another dtype or device starts a new tree), and a kept tree is stored under its
numerics' name (``kept_name``), so a bfloat16 run's K/V never reach a float32 run.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import models
from ..errors import UserError
from ..inputs import collate
from ..stats import Counters, ratio
from .base import TierOutput
from .model_io import (
    CACHE_KW,
    attention_mask,
    empty_cache,
    mask_layout,
    output_cache,
    plain_head,
    span_kv,
    stacked_cache,
)
from .packing import Block, Group, Packed, Row, pack, plan_rows, segment_rows, split_rows
from .radix import Match, RadixKV, from_tensors, to_tensors
from .schedule import assign_prefixes

DEFAULT_PREFIX_BYTES = 2 << 30
MIN_PREFIX = 8  # tokens; below this an item runs whole (and may reuse maps instead)
IDLE_AFTER = 64  # inputs: if none of the last ones shares even MIN_PREFIX tokens, stop inserting
# a packed row may always hold this many suffix tokens, however short its prefix
PACK_MIN_TOKENS = 32
# a group whose prefix is not cached runs as one row (prefix, then every member's suffix) when the
# row is at most this wide; a wider one computes its prefix first and packs rows over its K/V
IN_ROW_TOKENS = 512
# missing prefixes run side by side in rows up to this wide (or one per row, when longer): a row's
# attention grows with the square of its width, so two long prefixes in one row cost more (~25 % at
# 1200 tokens each, measured) than the padding they save
SIDE_BY_SIDE_TOKENS = 1024
# a forward's fixed cost in tokens of work (the weights are read once per forward): rows of very
# different widths run as separate forwards when the padding saved is worth more than this
FORWARD_TOKENS = 48


@dataclass
class PrefixStats(Counters):
    tokens_total: int = 0  # tokens of every input the tier was given
    tokens_run: int = (
        0  # tokens that went through the model (prefixes once, suffixes, whole inputs)
    )
    tokens_reused: int = 0  # prefix tokens inputs took from the tree instead of computing
    items: int = 0
    items_with_prefix: int = 0
    insert_s: float = 0.0

    def derived(self, c: dict[str, float]) -> dict[str, float]:
        saved = c["tokens_total"] - c["tokens_run"]
        return {"prefix_tokens_reused_fraction": ratio(saved, c["tokens_total"])}


def kept_name(numerics: str) -> str:
    """The name a kept tree of these numerics has in a ``db.TierFolder``."""
    return f"prefix.{numerics}"


class PrefixTier:
    """Runs decoder batches through a ``RadixKV``; returns the last ``keep`` positions' logits."""

    def __init__(
        self,
        model: nn.Module,
        max_bytes: int = DEFAULT_PREFIX_BYTES,
        min_prefix: int = MIN_PREFIX,
        pack: bool = True,
    ):
        self.model = model
        self.pack = pack  # inputs on one prefix share a row (a block mask); False: a row each
        self.min_prefix = min_prefix
        self.idle = False  # a workload without shared prefixes: matching goes on, inserting stops
        self.longest_shared = 0
        self._since_shared = 0  # inputs since one last shared MIN_PREFIX tokens with another
        self._recent_heads: deque[tuple[int, ...]] = deque(maxlen=IDLE_AFTER)
        self.numerics = models.numerics(model)  # the tree's K/V are of these numerics only
        self.tree = RadixKV(max_bytes)
        self.stats = PrefixStats()
        self.device = next(model.parameters()).device
        self.head = plain_head(model)  # None: the model's own forward computes logits
        layout = mask_layout(model)
        if layout is None:
            raise UserError(
                f"the prefix tier cannot run {type(model).__name__} exactly: its layers attend "
                "other than to all earlier keys or a sliding window of them"
            )
        self.layout = layout

    @property
    def empty(self) -> bool:
        return self.tree.bytes == 0

    def save(self, folder) -> None:
        """Keep the tree in a ``db.TierFolder`` (``--prefix-dir``): a restart starts warm."""
        self._follow_model()
        folder.write(kept_name(self.numerics), to_tensors(self.tree))

    def load(self, folder) -> bool:
        """Take the tree a ``db.TierFolder`` holds for this model's numerics (checksummed, for
        this model); False if none."""
        self._follow_model()
        data = folder.read(kept_name(self.numerics))
        if data is None:
            return False
        self.restore(data)
        return True

    def restore(self, data: dict[str, torch.Tensor]) -> None:
        """Start from a kept tree (``folder.read(kept_name(numerics))``); ``data`` stays
        unchanged, so one read can start several tiers. K/V of another dtype are refused."""
        self._follow_model()
        kv = data.get("kv")
        dtype = next(self.model.parameters()).dtype
        if kv is not None and kv.numel() and kv.dtype != dtype:
            raise UserError(
                f"the kept prefix K/V are {str(kv.dtype).replace('torch.', '')}, the model runs "
                f"in {str(dtype).replace('torch.', '')}; K/V of other numerics are not exact"
            )
        self.tree = from_tensors(
            {k: v.to(self.device) if k == "kv" else v for k, v in data.items()}, self.tree.max_bytes
        )

    def _follow_model(self) -> None:
        """A model moved to another dtype or device since the tree was built starts a new tree:
        K/V computed in other numerics would make the tier inexact."""
        now = models.numerics(self.model)
        if now != self.numerics:
            self.numerics = now
            self.device = next(self.model.parameters()).device
            self.tree = RadixKV(self.tree.max_bytes)

    def _watch_sharing(self, seqs: list[list[int]]) -> None:
        """The idle rule: idle once the last ``IDLE_AFTER`` inputs shared nothing; re-armed by an
        input whose first ``min_prefix`` tokens repeat a recent input's (or another's in the
        batch)."""
        heads = [tuple(s[: self.min_prefix]) for s in seqs if len(s) >= self.min_prefix]
        seen = set(self._recent_heads)
        repeats = len(set(heads)) < len(heads) or any(h in seen for h in heads)
        self._recent_heads.extend(heads)
        if repeats:
            self._since_shared = 0
            self.idle = False
        else:
            self._since_shared += len(seqs)

    def reset(self) -> None:
        self.tree = RadixKV(self.tree.max_bytes)

    def report(self) -> dict[str, float]:
        """Counters plus the tree's memory: bytes held now, the peak, and the cap."""
        return {
            **self.stats.as_dict(),
            "prefix_bytes_used": self.tree.bytes,
            "prefix_bytes_peak": self.tree.peak_bytes,
            "prefix_bytes_cap": self.tree.max_bytes,
            "prefix_leaves": len(self.tree),
        }

    @torch.no_grad()
    def run(
        self,
        seqs: list[list[int]],
        keep: int,
        pad_id: int,
        maps=None,
        insert: list[int] | None = None,
        needs: list[int] | None = None,
        states: bool = False,
    ) -> TierOutput:
        """Per item the logits of its last ``needs[i]`` positions ``[n, V]`` (fewer for an input
        shorter than that), and what happened. ``maps``: an attached map cache. ``states``: where
        the tier applies the head itself (``head``), return the decoder states there instead
        (``TierOutput.states`` says which items), so a caller can score many batches' positions
        in one pass over a large head.

        ``needs``: per item, how many of its last positions' logits the caller reads (default
        ``keep`` for all, at most ``keep``); everything before them may be reused. ``insert``:
        per item, how many of its leading tokens a later input shares (0: none), from a caller
        that sees the whole workload; the tier keeps the K/V a later input can use. None:
        unknown, keep what is computed (until the tier goes idle)."""
        self._follow_model()
        self._watch_sharing(seqs)
        count = len(seqs)
        needs = [keep] * count if needs is None else [min(n, keep) for n in needs]
        self.stats.add(items=count, tokens_total=sum(len(s) for s in seqs))
        limits = [max(0, len(s) - n) for s, n in zip(seqs, needs, strict=True)]
        wanted = [0] * count  # per item: prefix tokens it will take from the tree
        in_row: list[tuple[list[int], int]] = []  # groups (and prefix length) run in one row
        if not self.idle:
            got = assign_prefixes(
                seqs,
                limits,
                self.min_prefix,
                lambda tokens, n: self.tree.match(tokens, n).length,
                IN_ROW_TOKENS if self.pack else 0,
            )
            wanted, in_row = got.wanted, got.in_row
            self.longest_shared = max(self.longest_shared, got.longest_shared)
            with maps.paused() if maps is not None else contextlib.nullcontext():  # prefixes: exact
                self._ensure(got.missing)
        grouped = {i for g, _ in in_row for i in g}
        matches: list[Match | None] = []
        for i, seq in enumerate(seqs):
            use = None
            if i not in grouped:
                m = self.tree.match(seq, limits[i])
                self.longest_shared = max(self.longest_shared, m.length)
                use = m if m.length >= max(self.min_prefix, wanted[i]) else None
            if use is not None:
                self.tree.lock(use.node)
            matches.append(use)
        if any(m is not None for m in matches) or in_row:
            self._since_shared = 0  # something was shared after all (a held prefix)
        if not self.idle and self._since_shared >= IDLE_AFTER:
            self.idle = True
        out: list[torch.Tensor | None] = [None] * count
        from_states = [False] * count
        hits: list = [None] * count
        reused = [False] * count
        tokens = [m.length if m is not None else 0 for m in matches]
        try:
            fresh = [i for i, m in enumerate(matches) if m is None and i not in grouped]
            keep_kv = {i for i in fresh if insert is None or insert[i] > 0}
            for i, (logits, hit, replayed) in self._run_fresh(
                seqs, fresh, needs, pad_id, maps, keep_kv
            ).items():
                out[i], hits[i], reused[i] = logits, hit, replayed
            if grouped or any(m is not None for m in matches):
                with maps.paused() if maps is not None else contextlib.nullcontext():  # exact
                    got = self._run_rows(seqs, matches, in_row, needs, pad_id, insert, tokens)
                for i, tensor in got.items():
                    out[i], from_states[i] = tensor, self.head is not None
        finally:
            for m in matches:
                if m is not None:
                    self.tree.unlock(m.node)
        if not states and any(from_states):  # the head once over every input's positions
            idx = [i for i in range(count) if from_states[i]]
            flat = self.head(torch.cat([out[i] for i in idx]))
            for i, part in zip(idx, flat.split([len(out[i]) for i in idx]), strict=True):
                out[i], from_states[i] = part, False
        return TierOutput(out, hits, reused, tokens, from_states)

    def _ensure(self, prefixes: set[tuple[int, ...]]) -> None:
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
        packed = pack(rows, todo, [0] * len(todo), 0, 0, self.device)
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
        dtype = next(self.model.parameters()).dtype
        args = {
            "input_ids": packed.ids,
            "attention_mask": attention_mask(packed, self.layout, dtype),
            "position_ids": packed.positions,
            **kw,
        }
        if kw.get("use_cache") and CACHE_KW not in kw:
            args[CACHE_KW] = empty_cache()
        if self.head is not None:
            return self.model.get_decoder()(**args)
        return self.model(**args, logits_to_keep=keep)

    def _run_rows(
        self,
        seqs: list[list[int]],
        matches: list[Match | None],
        in_row: list[tuple[list[int], int]],
        needs: list[int],
        pad_id: int,
        insert: list[int] | None,
        tokens: list[int],
    ) -> dict[int, torch.Tensor]:
        """Every input with a prefix (cached, or computed in its group's row) in one forward, or
        a few when rows of very different widths would pad much; per input its last ``needs[i]``
        logits ``[needs[i], V]`` (decoder states ``[needs[i], d]`` where the tier has a ``head``);
        ``tokens[i]`` set to the prefix tokens it did not compute.

        K/V worth keeping enter the tree (``insert``: per input, the leading tokens a later input
        shares; None: unknown, keep what is computed): a block's prefix behind the K/V it read (a
        question behind its header), and an input's own tokens behind what it shares (one that
        read only a header opens a group the next batch continues)."""

        def wanted(i: int, held: int) -> bool:
            return not self.idle and (insert is None or insert[i] > held)

        reads = [(id(m.node), m.length) if m is not None else None for m in matches]
        groups = [
            Group(g, seqs[g[0]][:p], insert is None or any(insert[i] > 0 for i in g))
            for g, p in in_row
        ]
        limits = [max(0, len(s) - n) for s, n in zip(seqs, needs, strict=True)]
        plan = plan_rows(reads, seqs, groups, limits, PACK_MIN_TOKENS if self.pack else 0)
        for row in plan.rows:
            for block in row.blocks:
                block.insert = block.insert or bool(
                    row.past and block.prefix and any(wanted(i, row.past) for i in block.items)
                )
                for i in block.items:
                    tokens[i] = plan.reused[i]
        grow = {
            i
            for row in plan.rows
            for block in row.blocks
            if row.past
            for i in block.items
            if wanted(i, row.past + len(block.prefix))
        }
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
            got.update(self._forward_rows(rows, srcs, seqs, plan.suffixes, needs, pad_id, grow))
        return got

    def _forward_rows(
        self,
        rows: list[Row],
        sources: list[Match | None],
        seqs: list[list[int]],
        suffixes: list[list[int]],
        needs: list[int],
        pad_id: int,
        grow: set[int],
    ) -> dict[int, torch.Tensor]:
        """One forward over ``rows``; inserts the block prefixes marked ``insert`` (behind the
        row's past), then the inputs in ``grow`` (behind what they share)."""
        past_width = max(r.past for r in rows)
        packed = pack(rows, suffixes, needs, past_width, pad_id, self.device)
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
        if self.head is not None:  # the decoder's states at the needed positions (``run``: head)
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

    def _run_fresh(
        self,
        seqs: list[list[int]],
        idx: list[int],
        needs: list[int],
        pad_id: int,
        maps,
        keep_kv: set[int],
    ) -> dict[int, tuple[torch.Tensor, Any, bool]]:
        """Run inputs without a usable prefix as one batch (each input's logits at its
        ``needs[i]`` last positions); insert the K/V of those in ``keep_kv`` (none while idle:
        then no K/V cache is even built). Per input: its logits, its map-cache hit, and whether
        it replayed a map."""
        if not idx:
            return {}
        inputs = collate([seqs[i] for i in idx], pad_id, True, self.device)
        build = not self.idle and bool(keep_kv)
        cache = {CACHE_KW: empty_cache()} if build else {}
        keep = max(needs[i] for i in idx)
        res = self.model(**inputs, logits_to_keep=keep, use_cache=build, **cache)
        self.stats.add(tokens_run=sum(len(seqs[i]) for i in idx))
        batch_hits = list(maps.last_hits) if maps is not None else [None] * len(idx)
        reused = list(maps.last_reused) if maps is not None else [False] * len(idx)
        # rows are left-padded: each input's last positions are the batch's last positions
        got = {
            i: (res.logits[j, -min(needs[i], len(seqs[i])) :], batch_hits[j], bool(reused[j]))
            for j, i in enumerate(idx)
        }
        if build:
            skip = [reused[j] or i not in keep_kv for j, i in enumerate(idx)]
            self._insert_batch([seqs[i] for i in idx], output_cache(res), skip)
        return got

    def _insert_batch(self, seqs: list[list[int]], cache, reused: list[bool]) -> None:
        t0 = time.perf_counter()
        count = len(seqs)
        computed = [j for j in range(count) if not reused[j]]
        width = max(len(s) for s in seqs)
        for j, s in enumerate(seqs):
            if reused[j]:
                continue  # layers that replayed a map computed no keys for this item
            rows = []
            for layer in cache.layers:
                k, v = layer.keys, layer.values
                r = j if k.shape[0] == count else computed.index(j)
                rows.append(torch.stack([k[r, :, width - len(s) :], v[r, :, width - len(s) :]]))
            self.tree.insert(s, torch.stack(rows))
        self.stats.add(insert_s=time.perf_counter() - t0)
