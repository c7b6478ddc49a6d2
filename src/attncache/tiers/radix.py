"""A token-level radix tree of per-layer K/V: the store behind the exact prefix tier.

Each node's edge holds a run of tokens and their K/V for every layer, ``[n_layers, 2, H_kv, len,
d]``. ``match`` walks the tree and returns the longest cached prefix as views; ``insert`` adds the
new tokens' K/V, splitting an edge where two sequences diverge. Memory is bounded by ``max_bytes``:
the least recently used *evictable* leaf goes first. Evictable leaves sit in a heap (stale entries
are skipped when popped), so eviction never rescans the tree; a matched path can be locked
(``lock``/``unlock``) while a caller still needs its K/V, and locked nodes are never evicted.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]  # the edge from the parent
    kv: torch.Tensor | None  # [n_layers, 2, H_kv, len(tokens), d]; None at the root
    parent: Node | None
    children: dict[int, Node] = field(default_factory=dict)
    last_used: float = 0.0
    locks: int = 0
    attached: bool = True

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of a query: its length and K/V (views of the tree's tensors)."""

    length: int
    segments: tuple[torch.Tensor, ...]
    node: Node  # the deepest node the match reached (lock it to keep the path)

    def kv(self) -> torch.Tensor:
        """[n_layers, 2, H_kv, length, d]: a view when one edge holds the prefix, else a
        concatenation."""
        return self.segments[0] if len(self.segments) == 1 else torch.cat(self.segments, dim=3)


@dataclass(frozen=True)
class InsertResult:
    inserted: bool  # False: the claimed prefix (``start``) is no longer in the tree
    new_tokens: int  # tokens whose K/V the tree did not hold before
    evicted_bytes: int


class RadixKV:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.root = Node((), None, None)
        self.bytes = 0
        self.peak_bytes = 0  # before eviction brought it back under the cap
        self._clock = itertools.count(1)
        self._heap: list[tuple[float, int, Node]] = []
        self._order = itertools.count()

    def _touch(self, node: Node, now: float) -> None:
        node.last_used = now
        if not node.children and node is not self.root and node.locks == 0:
            heapq.heappush(self._heap, (now, next(self._order), node))

    # -- match
    # --------------------------------------------------------------------------------------
    def match(self, tokens: list[int], max_len: int) -> Match:
        """Longest cached prefix of ``tokens`` (at most ``max_len`` tokens)."""
        node, pos, segments = self.root, 0, []
        now = float(next(self._clock))
        while pos < max_len:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common(child.tokens, tokens, pos, max_len - pos)
            self._touch(child, now)
            segments.append(child.kv if n == len(child.tokens) else child.kv[:, :, :, :n])
            pos += n
            node = child
            if n < len(child.tokens):
                break
        return Match(pos, tuple(segments), node)

    def lock(self, node: Node) -> None:
        """Protect ``node`` and its ancestors from eviction until ``unlock``."""
        for n in _path(node):
            n.locks += 1

    def unlock(self, node: Node) -> None:
        for n in _path(node):
            n.locks -= 1
            assert n.locks >= 0, "unlock without lock"
            if n.locks == 0 and not n.children and n is not self.root and n.attached:
                heapq.heappush(self._heap, (n.last_used, next(self._order), n))

    # -- insert
    # ---------------------------------------------------------------------------------------
    def insert(self, tokens: list[int], kv: torch.Tensor, start: int = 0) -> InsertResult:
        """Add ``tokens`` with their K/V ``[n_layers, 2, H_kv, len(tokens) - start, d]``.

        ``start`` > 0: the K/V covers only ``tokens[start:]``; the first ``start`` tokens must
        already be in the tree (the prefix the input just reused). If they are not, nothing is
        inserted."""
        assert kv.shape[3] == len(tokens) - start, (kv.shape, len(tokens), start)
        node, pos = self.root, 0
        now = float(next(self._clock))
        added = 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                if pos < start:
                    return InsertResult(False, 0, 0)
                leaf = Node(tuple(tokens[pos:]), kv[:, :, :, pos - start :].clone(), node)
                node.children[tokens[pos]] = leaf
                self.bytes += leaf.nbytes
                self.peak_bytes = max(self.peak_bytes, self.bytes)
                added = len(leaf.tokens)
                self._touch(leaf, now)
                break
            n = _common(child.tokens, tokens, pos, len(tokens) - pos)
            if n < len(child.tokens):
                if pos + n < start:
                    return InsertResult(False, 0, 0)
                child = self._split(child, n)
            self._touch(child, now)
            pos += n
            node = child
        evicted = self._evict()
        return InsertResult(True, added, evicted)

    def _split(self, child: Node, n: int) -> Node:
        """Cut ``child``'s edge after ``n`` tokens; the new upper node is returned (the old one
        stays the lower part, so its place in the heap remains valid)."""
        parent = child.parent
        assert parent is not None and child.kv is not None
        # every lock on ``child`` runs through the new upper node: it inherits the count
        upper = Node(
            child.tokens[:n],
            child.kv[:, :, :, :n].clone(),
            parent,
            {},
            child.last_used,
            child.locks,
        )
        parent.children[child.tokens[0]] = upper
        child.tokens, child.kv, child.parent = (
            child.tokens[n:],
            child.kv[:, :, :, n:].clone(),
            upper,
        )
        upper.children[child.tokens[0]] = child
        return upper

    # -- eviction
    # -------------------------------------------------------------------------------------
    def _evict(self) -> int:
        freed = 0
        while self.bytes > self.max_bytes and self._heap:
            used, _, node = heapq.heappop(self._heap)
            stale = not node.attached or node.children or node.locks or node.last_used != used
            if stale:
                continue
            parent = node.parent
            assert parent is not None
            del parent.children[node.tokens[0]]
            node.attached = False
            self.bytes -= node.nbytes
            freed += node.nbytes
            if not parent.children and parent is not self.root and parent.locks == 0:
                heapq.heappush(self._heap, (parent.last_used, next(self._order), parent))
        return freed

    def __len__(self) -> int:
        """Number of leaves."""
        stack, leaves = [self.root], 0
        while stack:
            node = stack.pop()
            if not node.children and node is not self.root:
                leaves += 1
            stack.extend(node.children.values())
        return leaves


def _common(edge: tuple[int, ...], tokens: list[int], pos: int, limit: int) -> int:
    n, lim = 0, min(len(edge), limit)
    while n < lim and edge[n] == tokens[pos + n]:
        n += 1
    return n


def _path(node: Node) -> list[Node]:
    out = []
    cur: Node | None = node
    while cur is not None:
        out.append(cur)
        cur = cur.parent
    return out


def merge_into(tree: RadixKV, other: RadixKV) -> int:
    """Insert every path of ``other`` into ``tree`` (a parent's edge before its children's, each
    edge's K/V only), as the most recently used: where the cap is reached, ``tree``'s own
    least recently used leaves go first. Tokens ``tree`` did not hold before are returned."""
    added = 0
    device = _device(tree)
    stack: list[tuple[Node, list[int]]] = [(c, []) for c in other.root.children.values()]
    while stack:
        node, before = stack.pop()
        path = before + list(node.tokens)
        assert node.kv is not None
        got = tree.insert(path, node.kv.to(device or node.kv.device), start=len(before))
        if not got.inserted:  # its prefix was evicted for room: its subtree cannot go in
            continue
        added += got.new_tokens
        stack.extend((child, path) for child in node.children.values())
    return added


def _device(tree: RadixKV) -> torch.device | None:
    first = next(iter(tree.root.children.values()), None)
    return None if first is None or first.kv is None else first.kv.device


def to_tensors(tree: RadixKV) -> dict[str, torch.Tensor]:
    """The tree as flat tensors (nodes in breadth-first order: a parent before its children)."""
    nodes, parents, queue = [], [], [(tree.root, -1)]
    while queue:
        node, parent = queue.pop(0)
        if node is not tree.root:
            parents.append(parent)
            nodes.append(node)
        here = len(nodes) - 1 if node is not tree.root else -1
        queue.extend((child, here) for child in node.children.values())
    if not nodes:
        return {"parents": torch.zeros(0, dtype=torch.long)}
    lengths = [len(n.tokens) for n in nodes]
    return {
        "parents": torch.tensor(parents, dtype=torch.long),
        "offsets": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.long),
        "tokens": torch.tensor([t for n in nodes for t in n.tokens], dtype=torch.long),
        "last_used": torch.tensor([n.last_used for n in nodes], dtype=torch.float64),
        "kv": torch.cat([n.kv for n in nodes], dim=3),
    }


def from_tensors(data: dict[str, torch.Tensor], max_bytes: int) -> RadixKV:
    """A tree rebuilt from ``to_tensors`` (evicting down to ``max_bytes`` if the cap shrank)."""
    tree = RadixKV(max_bytes)
    parents = data["parents"].tolist()
    if not parents:
        return tree
    offsets, tokens, kv = data["offsets"].tolist(), data["tokens"].tolist(), data["kv"]
    built: list[Node] = []
    for i, p in enumerate(parents):
        parent = tree.root if p < 0 else built[p]
        lo, hi = offsets[i], offsets[i + 1]
        node = Node(
            tuple(tokens[lo:hi]),
            kv[:, :, :, lo:hi].clone(),
            parent,
            {},
            float(data["last_used"][i]),
        )
        parent.children[node.tokens[0]] = node
        tree.bytes += node.nbytes
        built.append(node)
    tree.peak_bytes = tree.bytes
    tree._clock = itertools.count(int(max(n.last_used for n in built)) + 1)
    for node in built:
        if not node.children:
            heapq.heappush(tree._heap, (node.last_used, next(tree._order), node))
    tree._evict()
    return tree
