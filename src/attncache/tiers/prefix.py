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
   in every suffix); the forwards of steps 2 and 3 are ``rows.py``'s;
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

K/V depend on the numerics that computed them: the tree belongs to one ``models.numerics``
(``kept.py``), so a bfloat16 run's K/V never reach a float32 run.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..inputs import collate
from ..stats import Counters, ratio
from .base import NO_OPTIONS, TierOptions, TierOutput
from .kept import NumericsTree
from .model_io import (
    CACHE_KW,
    empty_cache,
    mask_layout,
    output_cache,
    padded_kv,
    plain_head,
)
from .radix import Match, RadixKV
from .rows import RowModel, RowRunner, TierBatch
from .schedule import SharingWatch, assign_prefixes

DEFAULT_PREFIX_BYTES = 2 << 30
MIN_PREFIX = 8  # tokens; below this an item runs whole (and may reuse maps instead)
IDLE_AFTER = 64  # inputs: if none of the last ones shares even MIN_PREFIX tokens, stop inserting
# a group whose prefix is not cached runs as one row (prefix, then every member's suffix) when the
# row is at most this wide; a wider one computes its prefix first and packs rows over its K/V
IN_ROW_TOKENS = 512


@dataclass
class PrefixStats(Counters):
    tokens_total: int = 0  # tokens of every input the tier was given
    # tokens that went through the model (prefixes once, suffixes, whole inputs)
    tokens_run: int = 0
    tokens_reused: int = 0  # prefix tokens inputs took from the tree instead of computing
    items: int = 0
    items_with_prefix: int = 0
    insert_s: float = 0.0

    def derived(self, c: dict[str, float]) -> dict[str, float]:
        saved = c["tokens_total"] - c["tokens_run"]
        return {"prefix_tokens_reused_fraction": ratio(saved, c["tokens_total"])}


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
        self.min_prefix = min_prefix
        self.sharing = SharingWatch(min_prefix, IDLE_AFTER)
        self.longest_shared = 0
        self.kept = NumericsTree(model, max_bytes)  # K/V of the model's current numerics only
        self.stats = PrefixStats()
        layout = mask_layout(model)
        if layout is None:
            raise UserError(
                f"the prefix tier cannot run {type(model).__name__} exactly: its layers attend "
                "other than to all earlier keys or a sliding window of them"
            )
        # head None: the model's own forward computes logits
        target = RowModel(model, layout, plain_head(model))
        self.rows = RowRunner(target, self.kept, self.stats, pack)

    @property
    def head(self) -> nn.Module | None:
        """The separable head the tier applies itself (None: the model's forward does)."""
        return self.rows.target.head

    @head.setter
    def head(self, head: nn.Module | None) -> None:
        self.rows.target.head = head

    @property
    def idle(self) -> bool:
        """A workload without shared prefixes: matching goes on, inserting stops."""
        return self.sharing.idle

    @property
    def empty(self) -> bool:
        return self.tree.bytes == 0

    @property
    def tree(self) -> RadixKV:
        return self.kept.tree

    @property
    def numerics(self) -> str:
        return self.kept.numerics

    @property
    def device(self) -> torch.device:
        return self.kept.device

    def save(self, folder) -> None:
        self.kept.save(folder)

    def load(self, folder) -> bool:
        return self.kept.load(folder)

    def restore(self, data: dict[str, torch.Tensor]) -> None:
        self.kept.restore(data)

    def reset(self) -> None:
        self.kept.reset()

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
        self, seqs: list[list[int]], keep: int, pad_id: int, opts: TierOptions = NO_OPTIONS
    ) -> TierOutput:
        """Per item the logits of its last ``needs[i]`` positions ``[n, V]`` (fewer for an input
        shorter than that), and what happened. ``opts.maps``: an attached map cache.
        ``opts.states``: where the tier applies the head itself (``head``), return the decoder
        states there instead (``TierOutput.states`` says which items), so a caller can score many
        batches' positions in one pass over a large head.

        ``opts.needs``: per item, how many of its last positions' logits the caller reads
        (default ``keep`` for all, at most ``keep``); everything before them may be reused.
        ``opts.insert``: per item, how many of its leading tokens a later input shares (0: none);
        the tier keeps the K/V a later input can use. None: unknown, keep what is computed (until
        the tier goes idle)."""
        maps, insert, needs, states = opts.maps, opts.insert, opts.needs, opts.states
        self.kept.follow()
        self.sharing.observe(seqs)
        count = len(seqs)
        needs = [keep] * count if needs is None else [min(n, keep) for n in needs]
        self.stats.add(items=count, tokens_total=sum(len(s) for s in seqs))
        batch = TierBatch(seqs, needs, pad_id, insert)
        limits = batch.limits
        wanted = [0] * count  # per item: prefix tokens it will take from the tree
        in_row: list[tuple[list[int], int]] = []  # groups (and prefix length) run in one row
        if not self.idle:
            got = assign_prefixes(
                seqs,
                limits,
                self.min_prefix,
                lambda tokens, n: self.tree.match(tokens, n).length,
                IN_ROW_TOKENS if self.rows.packed else 0,
            )
            wanted, in_row = got.wanted, got.in_row
            self.longest_shared = max(self.longest_shared, got.longest_shared)
            with maps.paused() if maps is not None else contextlib.nullcontext():  # prefixes: exact
                self.rows.ensure(got.missing)
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
            self.sharing.read_held()
        self.sharing.settle()
        batch.keeping = not self.idle  # this batch may have made the tier idle
        out: list[torch.Tensor | None] = [None] * count
        from_states = [False] * count
        hits: list = [None] * count
        reused = [False] * count
        tokens = [m.length if m is not None else 0 for m in matches]
        try:
            fresh = [i for i, m in enumerate(matches) if m is None and i not in grouped]
            keep_kv = {i for i in fresh if insert is None or insert[i] > 0}
            for i, (logits, hit, replayed) in self._run_fresh(batch, fresh, maps, keep_kv).items():
                out[i], hits[i], reused[i] = logits, hit, replayed
            if grouped or any(m is not None for m in matches):
                with maps.paused() if maps is not None else contextlib.nullcontext():  # exact
                    got = self.rows.run(batch, matches, in_row, tokens)
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

    def _run_fresh(
        self, batch: TierBatch, idx: list[int], maps, keep_kv: set[int]
    ) -> dict[int, tuple[torch.Tensor, Any, bool]]:
        """Run inputs without a usable prefix as one batch (each input's logits at its
        ``needs[i]`` last positions); insert the K/V of those in ``keep_kv`` (none while idle:
        then no K/V cache is even built). Per input: its logits, its map-cache hit, and whether
        it replayed a map."""
        if not idx:
            return {}
        seqs, needs = batch.seqs, batch.needs
        inputs = collate([seqs[i] for i in idx], batch.pad_id, True, self.device)
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
            t0 = time.perf_counter()
            lengths = [len(seqs[i]) for i in idx]
            kept = [i in keep_kv for i in idx]
            for j, kv in padded_kv(output_cache(res), lengths, reused, kept).items():
                self.tree.insert(seqs[idx[j]], kv)
            self.stats.add(insert_s=time.perf_counter() - t0)
        return got
