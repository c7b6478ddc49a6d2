"""Tier 1 for decoders: compute shared prefixes once, run every suffix of a batch in one forward.
Exact.

With causal attention every hidden state of a prefix depends only on the prefix, so its keys and
values can be reused *exactly*: only the remaining tokens run, attending to the prefix K/V, kept in
a radix tree (``radix.py``). Per batch, ``PrefixTier.run``:

1. finds the inputs of the batch that share at least ``min_prefix`` tokens (``schedule.py``) and
makes
   sure the tree holds each group's shared prefix, computing what is missing once, for all groups in
   one forward;
2. gives every input the longest prefix it can reuse: its group's, or a longer one the tree holds
   from earlier batches (never the positions whose logits are needed);
3. runs all those inputs' suffixes as **one** batched forward over their prefixes' K/V (stacked per
   row and left-padded, with position ids starting where each prefix ends; a 2-D mask hides the
   padding, and the model builds the causal 4-D mask from it);
4. runs the inputs without a usable prefix together as usual, with the map cache (``maps``) applying
   to them, and inserts their K/V (an input whose layers reused maps has no keys there: not
   inserted).

If none of the first 64 inputs shares even ``min_prefix`` tokens with another (SST-2-like
workloads), the tier goes idle: it stops building K/V caches and inserting, so it costs about
nothing where it cannot help. Models with sliding-window layers keep only a window of K/V, so the
tier is not used for them.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from ..inputs import collate
from ..stats import Counters, ratio
from .base import TierOutput
from .radix import Match, RadixKV, from_tensors, to_tensors
from .schedule import prefix_groups, shared_prefix

DEFAULT_PREFIX_BYTES = 2 << 30
MIN_PREFIX = 8  # tokens; below this an item runs whole (and may reuse maps instead)
IDLE_AFTER = 64  # inputs: if none of the first ones shares even MIN_PREFIX tokens, stop inserting
PACK_MIN_TOKENS = (
    32  # a packed row may always hold this many suffix tokens, however short its prefix
)

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes
CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


def supports_prefix(model: nn.Module) -> bool:
    """Whether every layer's cache keeps all keys (no sliding window), so prefixes can be reused."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    types = getattr(cfg, "layer_types", None)
    if types:
        return not any("sliding" in str(t) for t in types)
    return (
        not getattr(cfg, "sliding_window", None)
        or getattr(cfg, "use_sliding_window", True) is False
    )


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
        self.tree = RadixKV(max_bytes)
        self.stats = PrefixStats()
        self.device = next(model.parameters()).device

    @property
    def empty(self) -> bool:
        return self.tree.bytes == 0

    def save(self, folder) -> None:
        """Keep the tree in a ``db.TierFolder`` (``--prefix-dir``): a restart starts warm."""
        folder.write("prefix", to_tensors(self.tree))

    def load(self, folder) -> bool:
        """Take the tree a ``db.TierFolder`` holds (checksummed, for this model); False if none."""
        data = folder.read("prefix")
        if data is None:
            return False
        self.tree = from_tensors(
            {k: v.to(self.device) if k == "kv" else v for k, v in data.items()}, self.tree.max_bytes
        )
        return True

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
        insert: list[bool] | None = None,
    ) -> TierOutput:
        """Logits ``[B, keep, V]`` and per item what happened. ``maps``: an attached map cache.

        ``insert``: per item, whether its K/V may help a later input (a caller that sees the whole
        workload knows; None: keep every input computed whole, until the tier goes idle)."""
        count = len(seqs)
        self.stats.add(items=count, tokens_total=sum(len(s) for s in seqs))
        limits = [max(0, len(s) - keep) for s in seqs]  # the last ``keep`` positions always run
        wanted = [0] * count  # per item: prefix tokens it will take from the tree
        if not self.idle:
            for members in prefix_groups(seqs, self.min_prefix):
                if len(members) > 1:
                    shared = min(shared_prefix(seqs, members), *(limits[i] for i in members))
                    self.longest_shared = max(self.longest_shared, shared)
                    for i in members:
                        wanted[i] = shared if shared >= self.min_prefix else 0
            with maps.paused() if maps is not None else contextlib.nullcontext():  # prefixes: exact
                self._ensure({tuple(seqs[i][: wanted[i]]) for i in range(count) if wanted[i]})
        matches: list[Match | None] = []
        for i, seq in enumerate(seqs):
            m = self.tree.match(seq, limits[i])
            self.longest_shared = max(self.longest_shared, m.length)
            use = m if m.length >= max(self.min_prefix, wanted[i]) else None
            if use is not None:
                self.tree.lock(use.node)
            matches.append(use)
        if (
            not self.idle
            and self.stats.items >= IDLE_AFTER
            and self.longest_shared < self.min_prefix
        ):
            self.idle = True
        out: list[torch.Tensor | None] = [None] * count
        hits: list = [None] * count
        reused = [False] * count
        try:
            fresh = [i for i, m in enumerate(matches) if m is None]
            keep_kv = {i for i in fresh if insert is None or insert[i]}
            self._run_fresh(fresh, seqs, keep, pad_id, maps, out, hits, reused, keep_kv)
            suffixed = [i for i, m in enumerate(matches) if m is not None]
            if suffixed:
                logits = self._run_suffixes(
                    [seqs[i] for i in suffixed], [matches[i] for i in suffixed], keep, pad_id
                )
                for j, i in enumerate(suffixed):
                    out[i] = logits[j]
        finally:
            for m in matches:
                if m is not None:
                    self.tree.unlock(m.node)
        tokens = [m.length if m is not None else 0 for m in matches]
        return TierOutput(torch.stack(out), hits, reused, tokens)

    def _ensure(self, prefixes: set[tuple[int, ...]]) -> None:
        """Make the tree hold every prefix: compute the missing ones (from what the tree has) at
        once."""
        todo = [list(p) for p in prefixes if self.tree.match(list(p), len(p)).length < len(p)]
        if not todo:
            return
        # Computed whole, in one batch: simpler than resuming each from its partial match, and the
        # common case (a new few-shot prompt, a new question) has no partial match worth resuming.
        inputs = collate(todo, 0, True, self.device)
        res = self.model(**inputs, logits_to_keep=1, use_cache=True)
        self.stats.add(tokens_run=sum(len(p) for p in todo))
        self._insert_batch(todo, output_cache(res), [False] * len(todo))

    def _run_suffixes(
        self, seqs: list[list[int]], matches: list[Match], keep: int, pad_id: int
    ) -> list[torch.Tensor]:
        """One forward for every input's suffix over its prefix K/V; per input its ``[keep, V]``
        logits.

        Inputs reusing the same prefix share one row (``pack``): their suffixes are concatenated,
        each attending to the prefix and to itself only, with position ids restarting where the
        prefix ends, so the prefix K/V is read once per row instead of once per input. A row takes
        suffixes up to the prefix's length in all (at least ``PACK_MIN_TOKENS``), then another
        starts. Otherwise each input is its own row."""
        lens = [m.length for m in matches]
        suffixes = [s[p:] for s, p in zip(seqs, lens, strict=True)]
        self.stats.add(
            items_with_prefix=len(seqs),
            tokens_reused=sum(lens),
            tokens_run=sum(len(x) for x in suffixes),
        )
        members: list[list[int]] = []  # per row, its inputs
        filling: dict[tuple[int, int], tuple[int, int]] = {}  # prefix -> (row, suffix tokens)
        for i, m in enumerate(matches):
            n, key = len(suffixes[i]), (id(m.node), m.length)
            row = filling.get(key) if self.pack else None
            # a packed row's attention grows with its whole width: keep it within the prefix's
            if row is not None and row[1] + n <= max(PACK_MIN_TOKENS, m.length):
                members[row[0]].append(i)
                filling[key] = (row[0], row[1] + n)
            else:
                members.append([i])
                filling[key] = (len(members) - 1, n)
        width_p = max(lens)
        width_s = max(sum(len(suffixes[i]) for i in items) for items in members)
        count = len(members)
        first = [matches[items[0]] for items in members]
        kvs = [m.kv() for m in first]  # [n_layers, 2, H_kv, P, d] per row
        if count == 1 or (
            len({id(m.node) for m in first}) == 1 and len({m.length for m in first}) == 1
        ):
            stacked = kvs[0].unsqueeze(2).expand(-1, -1, count, -1, -1, -1)  # one prefix: a view
        else:
            n_layers, _, n_kv, _, d = kvs[0].shape
            stacked = kvs[0].new_zeros((n_layers, 2, count, n_kv, width_p, d))
            for r, kv in enumerate(kvs):
                stacked[:, :, r, :, width_p - kv.shape[3] :] = kv
        past = DynamicCache(
            ddp_cache_data=[(stacked[i, 0], stacked[i, 1]) for i in range(len(stacked))],
            config=self.model.config,
        )
        dev = self.device
        ids = torch.full((count, width_s), pad_id, dtype=torch.long, device=dev)
        pos = torch.zeros((count, width_s), dtype=torch.long, device=dev)
        allowed = torch.zeros((count, width_s, width_p + width_s), dtype=torch.bool, device=dev)
        allowed[
            :, torch.arange(width_s, device=dev), width_p + torch.arange(width_s, device=dev)
        ] = True
        ends: dict[
            int, tuple[int, int]
        ] = {}  # input -> (row, end of its segment in the suffix region)
        for r, items in enumerate(members):
            p = first[r].length
            start = width_s - sum(len(suffixes[i]) for i in items)
            for i in items:
                n = len(suffixes[i])
                seg = slice(start, start + n)
                ids[r, seg] = torch.tensor(suffixes[i], device=dev)
                pos[r, seg] = torch.arange(p, p + n, device=dev)
                allowed[r, seg, width_p - p : width_p] = True  # the prefix
                causal = torch.ones((n, n), dtype=torch.bool, device=dev).tril()
                allowed[r, seg, width_p + start : width_p + start + n] = causal  # itself, causally
                ends[i] = (r, start + n)
                start += n
        mask = torch.zeros(allowed.shape, dtype=stacked.dtype, device=dev)
        mask.masked_fill_(~allowed, torch.finfo(stacked.dtype).min)
        wanted = sorted({e - k for (_, e) in ends.values() for k in range(keep, 0, -1)})
        where = {p: j for j, p in enumerate(wanted)}
        res = self.model(
            input_ids=ids,
            attention_mask=mask.unsqueeze(1),
            position_ids=pos,
            use_cache=True,
            logits_to_keep=torch.tensor(wanted, device=dev),
            **{CACHE_KW: past},
        )
        logits = res.logits
        return [
            logits[r, [where[e - k] for k in range(keep, 0, -1)]]
            for r, e in (ends[i] for i in range(len(seqs)))
        ]

    def _run_fresh(
        self,
        idx: list[int],
        seqs,
        keep: int,
        pad_id: int,
        maps,
        out: list,
        hits: list,
        reused_out: list,
        keep_kv: set[int],
    ) -> None:
        """Run inputs without a usable prefix as one batch; insert the K/V of those in ``keep_kv``
        (none while idle: then no K/V cache is even built)."""
        if not idx:
            return
        inputs = collate([seqs[i] for i in idx], pad_id, True, self.device)
        build = not self.idle and bool(keep_kv)
        res = self.model(**inputs, logits_to_keep=keep, use_cache=build)
        self.stats.add(tokens_run=sum(len(seqs[i]) for i in idx))
        batch_hits = list(maps.last_hits) if maps is not None else [None] * len(idx)
        reused = list(maps.last_reused) if maps is not None else [False] * len(idx)
        logits = res.logits
        if logits.shape[1] < keep:  # every input here is shorter than ``keep`` (set by inputs
            # that matched a prefix): pad in front, where no caller reads (it reads the last
            # positions of each input), so all outputs of the batch stack
            logits = torch.nn.functional.pad(logits, (0, 0, keep - logits.shape[1], 0))
        for j, i in enumerate(idx):
            out[i] = logits[j]
            hits[i] = batch_hits[j]
            reused_out[i] = reused[j]
        if build:
            skip = [reused[j] or i not in keep_kv for j, i in enumerate(idx)]
            self._insert_batch([seqs[i] for i in idx], output_cache(res), skip)

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


def output_cache(res):
    return getattr(res, "cache", None) if CACHE_KW == "cache" else res.past_key_values
