"""Tier 0: answers for token sequences seen before. Exact.

An input whose token ids (after the task's formatting) were answered before by the exact model is
answered from the memo: per sequence the log-probabilities a scoring asked for and the greedy next
token (decoders), or the embedding (encoders), keyed by a hash of the ids *and the numerics that
computed them* (``models.numerics``: dtype, device type, quantization), so a bfloat16 or int8 run's
answers are never served to a float32 run as exact. Only exact outputs are kept (an input that
replayed maps is never memoised). Bounded by an entry count, least recently used
first. The DB persists it (``Database.commit_memo``) with the same checksums and atomic commits as
the maps, so the model fingerprint guards it too.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..stats import Counters, ratio

DEFAULT_MEMO_ENTRIES = 100_000
# Stored with the arrays: memos written before keys carried their numerics are dropped on load
# (their answers may come from any dtype).
KEY_SCHEME = 2


def memo_key(seq: Sequence[int], numerics: str) -> bytes:
    h = hashlib.sha256(numerics.encode() + b"\0")
    h.update(np.asarray(seq, dtype=np.int64).tobytes())
    return h.digest()


@dataclass
class Answer:
    logprobs: dict[tuple[int, int], float] = field(
        default_factory=dict
    )  # (from_end, token) -> log p
    argmax: int = -1  # greedy next token after the sequence (decoders)
    embedding: np.ndarray | None = None  # encoders
    greedy: dict[int, int] = field(default_factory=dict)  # from_end -> greedy token (is_greedy)


@dataclass
class MemoStats(Counters):
    lookups: int = 0
    hits: int = 0
    inserts: int = 0

    def derived(self, c: dict[str, float]) -> dict[str, float]:
        return {"memo_hit_rate": ratio(c["hits"], c["lookups"])}


class ResultMemo:
    def __init__(self, max_entries: int = DEFAULT_MEMO_ENTRIES):
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[bytes, Answer] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = MemoStats()
        self.dirty = False  # holds answers the DB does not have yet
        self._fresh: set[bytes] = set()  # keys put since the last ``take_fresh``

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self,
        seq: Sequence[int],
        numerics: str,
        wanted: Sequence[tuple[int, int]] = (),
        embedding: bool = False,
        greedy: bool = False,
    ) -> Answer | None:
        """The answer ``numerics`` stored for ``seq`` if it covers every wanted (from_end, token)
        (and, with ``greedy``, the greedy token at each of their positions; or the embedding)."""
        key = memo_key(seq, numerics)
        with self._lock:
            got = self._entries.get(key)
            ok = (
                got is not None
                and all(w in got.logprobs for w in wanted)
                and (not embedding or got.embedding is not None)
                and (not greedy or all(f in got.greedy for f, _ in wanted))
            )
            if ok:
                self._entries.move_to_end(key)
        self.stats.add(lookups=1, hits=int(ok))
        return got if ok else None

    def put(self, seq: Sequence[int], numerics: str, answer: Answer) -> None:
        key = memo_key(seq, numerics)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:  # a later scoring may ask for other tokens: keep both
                answer = Answer(
                    {**old.logprobs, **answer.logprobs},
                    answer.argmax if answer.argmax >= 0 else old.argmax,
                    answer.embedding if answer.embedding is not None else old.embedding,
                    {**old.greedy, **answer.greedy},
                )
            self._entries[key] = answer
            self._fresh.add(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            self.dirty = True
        self.stats.add(inserts=1)

    def take_fresh(self) -> ResultMemo:
        """The answers put since the last call (still held here), as a memo of their own: what a
        worker hands to the one process that commits them."""
        twin = ResultMemo(self.max_entries)
        with self._lock:
            fresh, self._fresh = self._fresh, set()
            twin._entries = OrderedDict((k, self._entries[k]) for k in fresh if k in self._entries)
        twin.dirty = bool(twin._entries)
        return twin

    def copy(self) -> ResultMemo:
        twin = ResultMemo(self.max_entries)
        with self._lock:
            twin._entries = OrderedDict(self._entries)
        return twin

    def merge(self, other: ResultMemo) -> int:
        """Take ``other``'s answers (another process's commit, or a pass's copy) without touching
        recency of ours; returns how many were new here (the caller decides whether they are new
        to the DB)."""
        added = 0
        with self._lock:
            for key, answer in other._entries.items():
                if key not in self._entries:
                    self._entries[key] = answer
                    self._entries.move_to_end(key, last=False)
                    added += 1
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return added

    # -- persistence in a DB
    # ---------------------------------------------------------------------------
    @classmethod
    def load(cls, db, max_entries: int = DEFAULT_MEMO_ENTRIES) -> ResultMemo:
        arrays = db.memo_arrays()
        return cls.from_arrays(arrays, max_entries) if arrays is not None else cls(max_entries)

    def save(self, db, lock_wait_s: float = 2.0) -> bool:
        """Commit the answers this process added (merged with what others committed meanwhile)."""
        if not self.dirty:
            return True

        def merged(on_disk: dict | None) -> dict[str, np.ndarray]:
            if on_disk is not None:
                self.merge(ResultMemo.from_arrays(on_disk, self.max_entries))
            return self.to_arrays()

        if db.commit_memo(merged, lock_wait_s):
            self.dirty = False
            return True
        return False

    def save_to(self, folder) -> None:
        """Keep the answers in a ``db.TierFolder`` (``--prefix-dir``, serving without a DB),
        merged with what other processes kept there since this one read it."""

        def merged(on_disk: dict | None) -> dict[str, np.ndarray]:  # tensors by name
            if on_disk is not None:
                arrays = {k: v.numpy() for k, v in on_disk.items()}
                self.merge(ResultMemo.from_arrays(arrays, self.max_entries))
            return self.to_arrays()

        folder.update("memo", merged)
        self.dirty = False

    @classmethod
    def load_from(cls, folder, max_entries: int = DEFAULT_MEMO_ENTRIES) -> ResultMemo:
        data = folder.read("memo")
        if data is None:
            return cls(max_entries)
        return cls.from_arrays({k: v.numpy() for k, v in data.items()}, max_entries)

    # -- a flat, pickle-free form for safetensors
    # -----------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        with self._lock:
            items = list(self._entries.items())
        keys = (
            np.frombuffer(b"".join(k for k, _ in items), dtype=np.uint8).reshape(len(items), 32)
            if items
            else np.zeros((0, 32), np.uint8)
        )
        counts = np.array([len(a.logprobs) for _, a in items], dtype=np.int64)
        flat = [(f, t, v) for _, a in items for (f, t), v in a.logprobs.items()]
        tops = [(f, t) for _, a in items for f, t in a.greedy.items()]
        dims = {a.embedding.shape[0] for _, a in items if a.embedding is not None}
        dim = dims.pop() if dims else 0
        emb = np.zeros((len(items), dim), np.float32)
        has_emb = np.zeros(len(items), np.uint8)
        for i, (_, a) in enumerate(items):
            if a.embedding is not None and dim:
                emb[i], has_emb[i] = a.embedding, 1
        return {
            "keys": keys,
            "argmax": np.array([a.argmax for _, a in items], dtype=np.int64),
            "counts": counts,
            "from_end": np.array([f for f, _, _ in flat], dtype=np.int64),
            "token": np.array([t for _, t, _ in flat], dtype=np.int64),
            "logprob": np.array([v for _, _, v in flat], dtype=np.float32),
            "embedding": emb,
            "has_embedding": has_emb,
            "greedy_counts": np.array([len(a.greedy) for _, a in items], dtype=np.int64),
            "greedy_from_end": np.array([f for f, _ in tops], dtype=np.int64),
            "greedy_token": np.array([t for _, t in tops], dtype=np.int64),
            "key_scheme": np.array([KEY_SCHEME], dtype=np.int64),
        }

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], max_entries: int = DEFAULT_MEMO_ENTRIES
    ) -> ResultMemo:
        memo = cls(max_entries)
        scheme = arrays.get("key_scheme")
        if scheme is None or int(np.asarray(scheme).reshape(-1)[0]) != KEY_SCHEME:
            return memo  # keys without their numerics: no answer of it can be trusted as exact
        keys, counts = arrays["keys"], arrays["counts"]
        starts = np.concatenate([[0], np.cumsum(counts)])
        # memos written before greedy tokens were kept have none (older files: an empty table)
        g_counts = arrays.get("greedy_counts", np.zeros(len(keys), np.int64))
        g_starts = np.concatenate([[0], np.cumsum(g_counts)])
        g_from, g_tok = arrays.get("greedy_from_end", []), arrays.get("greedy_token", [])
        for i in range(len(keys)):
            lo, hi = int(starts[i]), int(starts[i + 1])
            lp = {
                (int(f), int(t)): float(v)
                for f, t, v in zip(
                    arrays["from_end"][lo:hi],
                    arrays["token"][lo:hi],
                    arrays["logprob"][lo:hi],
                    strict=True,
                )
            }
            emb = arrays["embedding"][i].copy() if arrays["has_embedding"][i] else None
            glo, ghi = int(g_starts[i]), int(g_starts[i + 1])
            top = {int(f): int(t) for f, t in zip(g_from[glo:ghi], g_tok[glo:ghi], strict=True)}
            memo._entries[bytes(keys[i])] = Answer(lp, int(arrays["argmax"][i]), emb, top)
        return memo
