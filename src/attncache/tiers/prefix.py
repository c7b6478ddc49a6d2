"""Tier 1 for decoders: reuse the keys and values of shared token prefixes, exactly.

With causal attention every hidden state of a prefix depends only on the prefix, so its keys and
values can be reused *exactly*: only the remaining tokens run, attending to the cached prefix K/V,
kept in a radix tree (``radix.py``). ``PrefixTier.run``:

- items with a cached prefix of P tokens run their suffix alone, with the prefix K/V as the cache
and
  position ids starting at P (at least the positions whose logits are needed always run);
- items without one run together as usual and their K/V is inserted afterwards;
- with a map cache attached (``maps``), map reuse applies to items without a prefix hit; an item
whose
  layers reused maps has no keys in those layers and is therefore not inserted;
- if none of the first 64 inputs shares even 8 tokens with an earlier one (SST-2-like workloads),
the tier
  goes idle: it stops building K/V caches and inserting, so it costs little where it cannot help.

Models with sliding-window layers (Gemma3, Mistral with a window) keep only a window of K/V in their
cache, so the tier is not used for them.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from ..inputs import collate
from ..stats import Counters, ratio
from .base import TierOutput
from .radix import Match, RadixKV

DEFAULT_PREFIX_BYTES = 2 << 30
MIN_PREFIX = 8  # tokens; below this an item runs whole (and may reuse maps instead)
IDLE_AFTER = 64  # inputs: if none of the first ones shares even MIN_PREFIX tokens, stop inserting

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes
CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


def supports_prefix(model: nn.Module) -> bool:
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    types = getattr(cfg, "layer_types", None) or []
    return not any("sliding" in str(t) for t in types) and not getattr(cfg, "sliding_window", None)


@dataclass
class PrefixStats(Counters):
    tokens_total: int = 0
    tokens_reused: int = 0
    items: int = 0
    items_with_prefix: int = 0
    insert_s: float = 0.0

    def derived(self, c: dict[str, float]) -> dict[str, float]:
        return {"prefix_tokens_reused_fraction": ratio(c["tokens_reused"], c["tokens_total"])}


class PrefixTier:
    """Runs decoder batches through a ``RadixKV``; returns the last ``keep`` positions' logits per
    item."""

    def __init__(
        self, model: nn.Module, max_bytes: int = DEFAULT_PREFIX_BYTES, min_prefix: int = MIN_PREFIX
    ):
        self.model = model
        self.min_prefix = min_prefix
        self.idle = (
            False  # set when a workload shows no shared prefixes; matching goes on, inserting stops
        )
        self.longest_match = 0
        self.tree = RadixKV(max_bytes)
        self.stats = PrefixStats()
        self.device = next(model.parameters()).device

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

    def _match(self, seq: list[int], keep: int) -> Match | None:
        """A usable cached prefix (locked until the caller unlocks it), or None."""
        m = self.tree.match(seq, max(0, len(seq) - keep))
        self.longest_match = max(self.longest_match, m.length)
        # A short shared prefix saves little and would keep the item from map reuse: run it whole.
        if m.length < self.min_prefix:
            return None
        self.tree.lock(m.node)
        return m

    @torch.no_grad()
    def run(self, seqs: list[list[int]], keep: int, pad_id: int, maps=None) -> TierOutput:
        """Logits ``[B, keep, V]`` and per item the map hit (or None). ``maps``: an attached map
        cache."""
        count = len(seqs)
        matches = [self._match(s, keep) for s in seqs]
        self.stats.add(items=count, tokens_total=sum(len(s) for s in seqs))
        out: list[torch.Tensor | None] = [None] * count
        hits: list = [None] * count
        fresh = [i for i, m in enumerate(matches) if m is None]
        if (
            not self.idle
            and self.stats.items >= IDLE_AFTER
            and self.longest_match < self.min_prefix
        ):
            self.idle = True
        waiting: list[int] = []
        if not self.idle:
            # Inputs sharing a long prefix with an earlier fresh input of this batch (one prompt,
            # several
            # continuations) wait: the first one's K/V is inserted, then they reuse it.
            leaders: list[int] = []
            for i in fresh:
                if any(common_prefix(seqs[i], seqs[j]) >= self.min_prefix for j in leaders):
                    waiting.append(i)
                else:
                    leaders.append(i)
            fresh = leaders
        self._run_fresh(fresh, seqs, keep, pad_id, maps, out, hits)
        if waiting:
            for i in waiting:
                matches[i] = self._match(seqs[i], keep)
            # a leader that reused maps was not inserted: its followers run whole
            self._run_fresh(
                [i for i in waiting if matches[i] is None], seqs, keep, pad_id, maps, out, hits
            )
        for i, m in enumerate(matches):
            if m is not None:
                try:
                    out[i] = self._run_suffix(seqs[i], m, keep)
                finally:
                    self.tree.unlock(m.node)
        return TierOutput(torch.stack(out), hits)

    def _run_suffix(self, seq: list[int], m: Match, keep: int) -> torch.Tensor:
        """One input whose first ``m.length`` tokens' K/V the tree holds: only the rest runs."""
        p = m.length
        self.stats.add(items_with_prefix=1, tokens_reused=p)
        prefix_kv = m.kv()
        past = DynamicCache(ddp_cache_data=_per_layer(prefix_kv), config=self.model.config)
        ids = torch.tensor([seq[p:]], device=self.device)
        pos = torch.arange(p, len(seq), device=self.device).unsqueeze(0)
        mask = torch.ones((1, len(seq)), dtype=torch.long, device=self.device)
        res = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=keep,
            **{CACHE_KW: past},
        )
        if not self.idle:
            self._insert_suffix(seq, p, output_cache(res))
        return res.logits[0]

    def _run_fresh(
        self, idx: list[int], seqs, keep: int, pad_id: int, maps, out: list, hits: list
    ) -> None:
        """Run inputs without a usable prefix as one batch; insert their K/V (unless idle)."""
        if not idx:
            return
        inputs = collate([seqs[i] for i in idx], pad_id, True, self.device)
        res = self.model(**inputs, logits_to_keep=keep, use_cache=not self.idle)
        batch_hits = list(maps.last_hits) if maps is not None else [None] * len(idx)
        reused = list(maps.last_reused) if maps is not None else [False] * len(idx)
        for j, i in enumerate(idx):
            out[i] = res.logits[j]
            hits[i] = batch_hits[j]
        if not self.idle:
            self._insert_batch([seqs[i] for i in idx], output_cache(res), reused)

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

    def _insert_suffix(self, seq: list[int], p: int, cache) -> None:
        """Insert ``seq[p:]`` of an input that reused a ``p``-token prefix (copies the suffix
        only)."""
        t0 = time.perf_counter()
        if cache.layers[0].keys.shape[2] == len(seq):
            kv = torch.stack(
                [
                    torch.stack([layer.keys[0, :, p:], layer.values[0, :, p:]])
                    for layer in cache.layers
                ]
            )
            self.tree.insert(seq, kv, start=p)
        self.stats.add(insert_s=time.perf_counter() - t0)


def output_cache(res):
    return getattr(res, "cache", None) if CACHE_KW == "cache" else res.past_key_values


def common_prefix(a: list[int], b: list[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _per_layer(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[n_layers, 2, H_kv, P, d] -> per layer (K [1, H_kv, P, d], V [1, H_kv, P, d])."""
    return [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(kv.shape[0])]
