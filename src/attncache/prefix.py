"""The exact tier for decoders: reuse the keys and values of shared token prefixes.

With causal attention every hidden state of a prefix depends only on the prefix, so its keys and values
can be reused *exactly*: only the remaining tokens run, attending to the cached prefix K/V. Entries live in
a token-level radix tree (``RadixKV``): each edge holds a run of tokens and their K/V for every layer,
``[n_layers, 2, H_kv, len, d]``. A lookup walks the tree and returns the longest cached prefix; an insert
adds the new tokens' K/V, splitting an edge where two sequences diverge. Memory is bounded
(``max_bytes``): least-recently-used leaves are evicted first.

``PrefixRunner`` runs batches through the model with the tree:
- items with a cached prefix of P tokens run their suffix alone, with the prefix K/V as ``past_key_values``
  and position ids starting at P (at least the positions whose logits are needed always run);
- items without one run together as usual and their K/V is inserted afterwards;
- with an attention-map cache attached, map reuse applies to items without a prefix hit; an item whose
  layers reused maps has no keys in those layers and is therefore not inserted;
- if none of the first 64 inputs shares even 8 tokens with an earlier one (SST-2-like workloads), the tier
  goes idle: it stops building K/V caches and inserting, so it costs little where it cannot help.

Models with sliding-window layers (Gemma3, Mistral with a window) keep only a window of K/V in their cache,
so the tier is not used for them.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from .inputs import collate

DEFAULT_PREFIX_BYTES = 2 << 30
MIN_PREFIX = 8  # tokens; below this an item runs whole (and may reuse maps instead)
IDLE_AFTER = 64  # inputs: if none of the first ones shares even MIN_PREFIX tokens, stop paying for insertion


@dataclass
class _Edge:
    tokens: tuple[int, ...]
    kv: torch.Tensor  # [n_layers, 2, H_kv, len(tokens), d]
    child: _Node
    used: float = 0.0


@dataclass
class _Node:
    edges: dict[int, _Edge] = field(default_factory=dict)
    parent: _Node | None = None


class RadixKV:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.root = _Node()
        self.bytes = 0
        self.peak_bytes = 0  # before eviction brought it back under the cap
        self._clock = 0.0

    def _tick(self) -> float:
        self._clock += 1.0
        return self._clock

    def match(self, tokens: list[int], max_len: int) -> tuple[int, list[torch.Tensor]]:
        """Longest cached prefix of ``tokens`` (at most ``max_len`` tokens): (length, K/V segments)."""
        node, pos, segs = self.root, 0, []
        now = self._tick()
        while pos < max_len:
            e = node.edges.get(tokens[pos])
            if e is None:
                break
            n = 0
            lim = min(len(e.tokens), max_len - pos)
            while n < lim and e.tokens[n] == tokens[pos + n]:
                n += 1
            e.used = now
            segs.append(e.kv[:, :, :, :n] if n < len(e.tokens) else e.kv)
            pos += n
            if n < len(e.tokens):
                break
            node = e.child
        return pos, segs

    def insert(self, tokens: list[int], kv: torch.Tensor, start: int = 0) -> bool:
        """Add ``tokens`` with their K/V ``[n_layers, 2, H_kv, len(tokens) - start, d]`` (shared parts kept once).

        ``start`` > 0: the K/V covers only ``tokens[start:]``; the first ``start`` tokens must already be in
        the tree (the prefix the input just reused). If they were evicted meanwhile, nothing is inserted
        and False is returned.
        """
        assert kv.shape[3] == len(tokens) - start, (kv.shape, len(tokens), start)
        node, pos = self.root, 0
        now = self._tick()
        while pos < len(tokens):
            e = node.edges.get(tokens[pos])
            if e is None:
                if pos < start:
                    return False
                new = _Edge(tuple(tokens[pos:]), kv[:, :, :, pos - start:].clone(), _Node(parent=node), now)
                node.edges[tokens[pos]] = new
                self.bytes += new.kv.numel() * new.kv.element_size()
                self.peak_bytes = max(self.peak_bytes, self.bytes)
                break
            n = 0
            lim = min(len(e.tokens), len(tokens) - pos)
            while n < lim and e.tokens[n] == tokens[pos + n]:
                n += 1
            e.used = now
            if n < len(e.tokens):  # split the edge at n
                if pos + n < start:
                    return False
                mid = _Node(parent=node)
                tail = _Edge(e.tokens[n:], e.kv[:, :, :, n:].clone(), e.child, e.used)
                e.child.parent = mid
                mid.edges[tail.tokens[0]] = tail
                e.tokens, e.kv, e.child = e.tokens[:n], e.kv[:, :, :, :n].clone(), mid
            pos += n
            node = e.child
        self._evict()
        return True

    def _leaves(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            for first, e in node.edges.items():
                if e.child.edges:
                    stack.append(e.child)
                else:
                    yield node, first, e

    def _evict(self) -> None:
        while self.bytes > self.max_bytes:
            victim = min(self._leaves(), key=lambda t: t[2].used, default=None)
            if victim is None:
                break
            node, first, e = victim
            del node.edges[first]
            self.bytes -= e.kv.numel() * e.kv.element_size()

    def __len__(self) -> int:
        return sum(1 for _ in self._leaves())


def supports_prefix(model: nn.Module) -> bool:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(cfg, "layer_types", None) or []
    return not any("sliding" in str(t) for t in types) and not getattr(cfg, "sliding_window", None)


@dataclass
class PrefixStats:
    tokens_total: int = 0
    tokens_reused: int = 0
    items: int = 0
    items_with_prefix: int = 0
    insert_s: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["prefix_tokens_reused_fraction"] = self.tokens_reused / self.tokens_total if self.tokens_total else 0.0
        return d


class PrefixRunner:
    """Runs decoder batches through a ``RadixKV``; returns the last ``keep`` positions' logits per item."""

    def __init__(self, model: nn.Module, max_bytes: int = DEFAULT_PREFIX_BYTES, min_prefix: int = MIN_PREFIX):
        self.model = model
        self.min_prefix = min_prefix
        self.idle = False  # set when a workload shows no shared prefixes; matching continues, inserting stops
        self.longest_match = 0
        self.tree = RadixKV(max_bytes)
        self.stats = PrefixStats()
        self.device = next(model.parameters()).device

    def reset(self) -> None:
        self.tree = RadixKV(self.tree.max_bytes)

    def report(self) -> dict:
        """Counters plus the tree's memory: bytes held now, the peak, and the cap."""
        return {**self.stats.as_dict(), "prefix_bytes_used": self.tree.bytes,
                "prefix_bytes_peak": self.tree.peak_bytes, "prefix_bytes_cap": self.tree.max_bytes,
                "prefix_leaves": len(self.tree)}

    @torch.no_grad()
    def logits(self, seqs: list[list[int]], keep: int, pad_id: int) -> tuple[torch.Tensor, list]:
        """([B, keep, V] logits, per item the map hit or None). Works with or without an attached map cache."""
        attached = getattr(self.model, "_attncache_attached", None)
        B = len(seqs)
        matches = [self.tree.match(s, max(0, len(s) - keep)) for s in seqs]
        self.longest_match = max([self.longest_match] + [p for p, _ in matches])
        # A short shared prefix saves little and would keep the item from map reuse: run it whole.
        matches = [(p, segs) if p >= self.min_prefix else (0, []) for p, segs in matches]
        self.stats.items += B
        self.stats.tokens_total += sum(len(s) for s in seqs)
        out: list[torch.Tensor | None] = [None] * B
        hits: list = [None] * B
        fresh = [i for i, (p, _) in enumerate(matches) if p == 0]
        if not self.idle and self.stats.items >= IDLE_AFTER and self.longest_match < self.min_prefix:
            self.idle = True
        waiting: list[int] = []
        if not self.idle:
            # Inputs sharing a long prefix with an earlier fresh input of this batch (one prompt, several
            # continuations) wait: the first one's K/V is inserted, then they reuse it.
            leaders: list[int] = []
            for i in fresh:
                if any(_common_prefix(seqs[i], seqs[j]) >= self.min_prefix for j in leaders):
                    waiting.append(i)
                else:
                    leaders.append(i)
            fresh = leaders
        self._run_fresh(fresh, seqs, keep, pad_id, attached, out, hits)
        if waiting:
            for i in waiting:
                p, segs = self.tree.match(seqs[i], max(0, len(seqs[i]) - keep))
                matches[i] = (p, segs) if p >= self.min_prefix else (0, [])
            # a leader that reused maps was not inserted: its followers run whole
            self._run_fresh([i for i in waiting if matches[i][0] == 0], seqs, keep, pad_id, attached, out, hits)
        for i, (p, segs) in enumerate(matches):
            if p == 0:
                continue
            s = seqs[i]
            self.stats.items_with_prefix += 1
            self.stats.tokens_reused += p
            prefix_kv = segs[0] if len(segs) == 1 else torch.cat(segs, dim=3)  # views when one edge holds it
            past = DynamicCache(ddp_cache_data=_per_layer(prefix_kv), config=self.model.config)
            ids = torch.tensor([s[p:]], device=self.device)
            pos = torch.arange(p, len(s), device=self.device).unsqueeze(0)
            mask = torch.ones((1, len(s)), dtype=torch.long, device=self.device)
            res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=keep, **{CACHE_KW: past})
            out[i] = res.logits[0]
            if not self.idle:
                self._insert_one(s, p, _output_cache(res))
        return torch.stack(out), hits

    def _run_fresh(self, idx: list[int], seqs, keep: int, pad_id: int, attached, out: list, hits: list) -> None:
        """Run inputs without a usable prefix as one batch; insert their K/V (unless idle)."""
        if not idx:
            return
        inp = {k: v.to(self.device) for k, v in collate([seqs[i] for i in idx], pad_id, True).items()}
        res = self.model(**inp, logits_to_keep=keep, use_cache=not self.idle)
        batch_hits = list(attached.last_hits) if attached is not None else [None] * len(idx)
        reused = list(attached.last_reused) if attached is not None else [False] * len(idx)
        for j, i in enumerate(idx):
            out[i] = res.logits[j]
            hits[i] = batch_hits[j]
        if not self.idle:
            self._insert_batch([seqs[i] for i in idx], _output_cache(res), reused)

    def _insert_batch(self, seqs: list[list[int]], cache, reused: list[bool]) -> None:
        t0 = time.perf_counter()
        B = len(seqs)
        misses = [j for j in range(B) if not reused[j]]
        T = max(len(s) for s in seqs)
        layers = cache.layers
        for j, s in enumerate(seqs):
            if reused[j]:
                continue  # layers that replayed a map computed no keys for this item
            rows = []
            for layer in layers:
                k, v = layer.keys, layer.values
                r = j if k.shape[0] == B else misses.index(j)
                rows.append(torch.stack([k[r, :, T - len(s):], v[r, :, T - len(s):]]))
            self.tree.insert(s, torch.stack(rows))
        self.stats.insert_s += time.perf_counter() - t0

    def _insert_one(self, s: list[int], p: int, cache) -> None:
        """Insert the suffix ``s[p:]`` of an input that reused a ``p``-token prefix (copies the suffix only)."""
        t0 = time.perf_counter()
        if cache.layers[0].keys.shape[2] == len(s):
            kv = torch.stack([torch.stack([layer.keys[0, :, p:], layer.values[0, :, p:]]) for layer in cache.layers])
            self.tree.insert(s, kv, start=p)
        self.stats.insert_s += time.perf_counter() - t0


# transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _output_cache(res):
    return getattr(res, "cache", None) if CACHE_KW == "cache" else res.past_key_values


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _per_layer(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[n_layers, 2, H_kv, P, d] -> per layer (K [1, H_kv, P, d], V [1, H_kv, P, d])."""
    return [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(kv.shape[0])]
