"""Running a plan's sequences through the tiers: memo -> prefix tier -> the model (maps attached).

1. **memo** (tier 0): a sequence answered before (exactly) is answered from it, no forward at all;
2. the rest is batched: decoders with the prefix tier by shared prefix first, length second
   (``tiers/schedule.py``); otherwise by length (less padding);
3. each batch runs through the **prefix tier** (tier 1: shared prefixes computed once, suffixes in
one
   forward) or the model directly; an attached map cache applies to whatever the model computes
   whole;
4. exact answers (no map replayed) go into the memo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import models
from ..inputs import collate, length_batches
from ..progress import Stage
from ..tiers import PrefixTier, TierOptions
from ..tiers.memo import Answer, ResultMemo
from ..tiers.schedule import prefix_batches, prefix_groups, shared_prefix
from .plan import Plan, Query
from .scoring import Pending, Scored

# A workload that can skip less than this share of its tokens runs without the prefix tier: its
# extra work (masks, a prefix forward, padding between rows) would cost more than it saves.
# Measured (docs/results.md) against plain SDPA at the same batch size: PIQA, 17 % of tokens
# shared (a goal and its two solutions), 1.03-1.11x; HellaSwag (50 %) 1.5x; ARC-Easy 5-shot
# (83 %) 4.3x.
MIN_SAVED_SHARE = 0.15


@dataclass
class RunOutput:
    logprobs: dict[tuple[int, int, int], float]  # (seq, from_end, token) -> log p
    argmax: list[int]  # decoders: greedy next token per seq
    embeddings: np.ndarray | None  # encoders: [n_seqs, D]
    hit: list[bool]
    seconds: float
    distance: list[float] = field(default_factory=list)  # per seq: the hit's distance (inf: none)
    # per seq, what the tiers did: answered from the memo, prefix tokens reused, maps replayed
    memo_hit: list[bool] = field(default_factory=list)
    prefix_tokens: list[int] = field(default_factory=list)
    replayed: list[bool] = field(default_factory=list)
    greedy: dict[tuple[int, int], int] = field(default_factory=dict)  # (seq, from_end) -> token

    def placed(self, ids: list[int], n: int) -> RunOutput:
        """This output of a subset plan in its whole plan's numbering (``ids[j]``: the whole
        plan's id of the subset's sequence j; ``Plan.subset_seqs``); time not carried over."""
        out = RunOutput.empty(n)
        for name in ("argmax", "hit", "distance", "memo_hit", "prefix_tokens", "replayed"):
            mine, theirs = getattr(self, name), getattr(out, name)
            for j, q in enumerate(ids):
                theirs[q] = mine[j]
        out.logprobs = {(ids[s], e, t): v for (s, e, t), v in self.logprobs.items()}
        out.greedy = {(ids[s], e): v for (s, e), v in self.greedy.items()}
        if self.embeddings is not None:
            out.embeddings = np.zeros((n, self.embeddings.shape[1]), self.embeddings.dtype)
            out.embeddings[ids] = self.embeddings
        return out

    @classmethod
    def empty(cls, n: int) -> RunOutput:
        return cls(
            {},
            [0] * n,
            None,
            [False] * n,
            0.0,
            [float("inf")] * n,
            [False] * n,
            [0] * n,
            [False] * n,
        )


def _reusable(seqs: list[list[int]], group: list[int], needs: list[int]) -> int:
    """Prefix tokens each member of ``group`` can take from the tier: the shared prefix, less any
    of the trailing positions whose logits a member needs."""
    shared = shared_prefix(seqs, group)
    return max(0, min(shared, *(len(seqs[j]) - n for j, n in zip(group, needs, strict=True))))


def _wanted(plan: Plan) -> dict[int, list[Query]]:
    wanted: dict[int, list[Query]] = {}
    for r in plan.rows:
        for qs in r.queries:
            for q in qs:
                wanted.setdefault(q.seq, []).append(q)
    return wanted


@dataclass
class RunOptions:
    """How ``run`` schedules a plan."""

    batch_size: int = 8  # inputs per forward for the plain model (the prefix tier sizes by tokens)
    progress: bool = True
    desc: str = "forward"
    # the plan is the whole workload: the prefix tier keeps only K/V a later input shares (a
    # server, which cannot see the next request, passes False and keeps what it computes)
    lookahead: bool = True
    keep_prefixes: bool = False  # keep every group's shared prefix too (a tree saved for later)
    seq_ids: list[int] | None = None  # only these sequences (the others keep what ``into`` holds)
    into: RunOutput | None = None
    # also keep the greedy token at every queried position (``RunOutput.greedy``: lm-eval's
    # is_greedy); memo answers without them are then misses
    greedy: bool = False


@dataclass
class Tiers:
    """What ``run`` reuses: an attached map cache, the prefix tier, the memo (None: not used)."""

    attached: Any = None  # runtime.Attachment
    prefix: PrefixTier | None = None
    memo: ResultMemo | None = None


NO_TIERS = Tiers()


@torch.no_grad()
def run(
    model: nn.Module,
    tokenizer,
    plan: Plan,
    opts: RunOptions | None = None,
    tiers: Tiers = NO_TIERS,
) -> RunOutput:
    """Forward every planned sequence once and collect what the rows need, through ``tiers``:
    answer sequences seen before from the memo (and add this run's exact answers), shared
    prefixes through the prefix tier, the rest through the model with maps attached."""
    opts = opts or RunOptions()
    attached, prefix, memo = tiers.attached, tiers.prefix, tiers.memo
    progress, desc, seq_ids, into = opts.progress, opts.desc, opts.seq_ids, opts.into
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if attached is not None and attached.inert:
        attached = None  # a policy that reuses nothing: the plain model
    need = plan.need()
    wanted = _wanted(plan)
    out = into if into is not None else RunOutput.empty(len(plan.seqs))
    todo = list(range(len(plan.seqs))) if seq_ids is None else list(seq_ids)
    device = next(model.parameters()).device
    t_start = time.perf_counter()
    # memo answers are kept per numerics (dtype, device, int8)
    scope = _MemoScope(memo, models.numerics(model), opts.greedy) if memo is not None else None
    if scope is not None:
        answered = {i for i in todo if scope.read(plan, i, wanted, out)}
        for i in answered:
            out.memo_hit[i] = True
        todo = [i for i in todo if i not in answered]
    sched = _schedule(plan, todo, need, prefix, opts)
    prefix, insert = sched.prefix, sched.insert
    seconds = time.perf_counter() - t_start
    head = prefix.head if prefix is not None else None
    pending = Pending(head, opts.greedy)  # states from several batches meet the head together

    def record(done: _Done, scores: list[Scored] | None) -> None:
        for j, i in enumerate(done.batch):
            out.replayed[i], out.prefix_tokens[i] = bool(done.reused[j]), int(done.prefix[j])
            if done.hits is not None:
                out.hit[i] = done.hits[j] is not None
                if out.hit[i]:
                    out.distance[i] = done.hits[j].distance
            if scores is not None:
                out.argmax[i] = scores[j].argmax
                for q, value in zip(wanted.get(i, []), scores[j].values, strict=True):
                    out.logprobs[(i, q.from_end, q.token)] = value
                if opts.greedy:
                    for q in wanted.get(i, []):
                        out.greedy[(i, q.from_end)] = scores[j].greedy[q.from_end]
            if scope is not None and not done.reused[j]:
                scope.write(plan, i, wanted, out)

    with Stage(len(todo), desc, progress) as bar:
        for picked in sched.batches:
            batch = [todo[j] for j in picked]
            t0 = time.perf_counter()
            seqs = [plan.seqs[i] for i in batch]
            reused = [False] * len(batch)
            prefix_tokens = [0] * len(batch)
            if plan.causal:
                keep = max(need[i] for i in batch)
                states = None
                if prefix is not None:
                    flags = [insert[i] for i in batch] if insert is not None else None
                    asks = TierOptions(attached, flags, [need[i] for i in batch], states=True)
                    res = prefix.run(seqs, keep, pad, asks)
                    logits, hits, reused, prefix_tokens, states = res
                else:
                    logits = model(**collate(seqs, pad, True, device), logits_to_keep=keep).logits
                    hits = list(attached.last_hits) if attached is not None else None
                    reused = list(attached.last_reused) if attached is not None else reused
                    logits = [  # left-padded: every item's last positions are the batch's
                        logits[j, -min(need[i], len(plan.seqs[i])) :] for j, i in enumerate(batch)
                    ]
                done = _Done(batch, hits, reused, prefix_tokens)
                queries = [wanted.get(i, []) for i in batch]
                ready = pending.add(logits, queries, states, done)
                seconds += time.perf_counter() - t0
                for answered, scores in ready:
                    record(answered, scores)
            else:
                inputs = collate(seqs, pad, False, device)
                hidden = model(**inputs).last_hidden_state
                real = inputs["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden.float() * real).sum(1) / real.sum(1).clamp_min(1.0)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                hits = attached.last_hits if attached is not None else None
                reused = list(attached.last_reused) if attached is not None else reused
                seconds += time.perf_counter() - t0
                if out.embeddings is None:
                    out.embeddings = np.zeros((len(plan.seqs), pooled.shape[-1]), np.float32)
                for j, i in enumerate(batch):
                    out.embeddings[i] = pooled[j].cpu().numpy()
                record(_Done(batch, hits, reused, prefix_tokens), None)
            if attached is not None and attached.learning:
                attached.learn_pending()  # outside the timed region: learning is a side job
            bar.update(len(batch))
        t0 = time.perf_counter()
        ready = pending.flush()
        seconds += time.perf_counter() - t0
        for answered, scores in ready:
            record(answered, scores)
    out.seconds += seconds
    return out


@dataclass
class _Schedule:
    batches: list[list[int]]  # positions in ``todo``, per forward
    prefix: PrefixTier | None  # None: the workload runs without the tier
    insert: dict[int, int] | None  # per sequence: leading tokens a later batch reads (None: ?)


def _schedule(
    plan: Plan, todo: list[int], need: list[int], prefix: PrefixTier | None, opts: RunOptions
) -> _Schedule:
    """The batches the sequences ``todo`` run in, and what the prefix tier should keep. With the
    tier and the whole workload in view (``lookahead``): groups sharing a prefix run together,
    batches sized by the tokens the tier will run, and only the prefixes a later batch reads
    are kept (every group's with ``keep_prefixes``); a workload that shares too little runs
    without the tier. Otherwise batches by length."""
    lengths = [len(plan.seqs[i]) for i in todo]
    seqs = [plan.seqs[i] for i in todo]
    insert: dict[int, int] | None = None
    groups: list[list[int]] | None = None
    reusable: list[int] | None = None  # per group: prefix tokens its later members reuse
    if plan.causal and prefix is not None and not prefix.idle and opts.lookahead:
        groups = prefix_groups(seqs, prefix.min_prefix)
        reusable = [
            _reusable(seqs, g, [need[todo[j]] for j in g]) if len(g) > 1 else 0 for g in groups
        ]
        saved = sum((len(g) - 1) * r for g, r in zip(groups, reusable, strict=True))
        if prefix.empty and saved < MIN_SAVED_SHARE * sum(lengths):
            return _Schedule(list(length_batches(lengths, opts.batch_size)), None, None)
        insert = {}
    if prefix is None or prefix.idle:
        return _Schedule(list(length_batches(lengths, opts.batch_size)), prefix, None)
    batches = prefix_batches(seqs, opts.batch_size, prefix.min_prefix, groups, reusable)
    if insert is not None and groups is not None and reusable is not None:
        batch_of = {todo[j]: b for b, picked in enumerate(batches) for j in picked}
        for g, r in zip(groups, reusable, strict=True):
            spans = opts.keep_prefixes or len({batch_of[todo[j]] for j in g}) > 1
            insert.update({todo[j]: r if spans else 0 for j in g})
    return _Schedule(batches, prefix, insert)


@dataclass
class _Done:
    """A batch run, waiting for its answers: its sequences and what the tiers did for each."""

    batch: list[int]
    hits: list | None
    reused: list[bool]
    prefix: list[int]  # prefix tokens each took from the tree


@dataclass
class _MemoScope:
    """The memo as seen by one model's numerics: reads and writes a sequence's answers."""

    memo: ResultMemo
    numerics: str
    greedy: bool = False  # answers carry (and must carry) the greedy token per queried position

    def read(self, plan: Plan, i: int, wanted: dict[int, list[Query]], out: RunOutput) -> bool:
        seq = plan.seqs[i]
        if plan.causal:
            keys = [(q.from_end, q.token) for q in wanted.get(i, [])]
            got = self.memo.get(seq, self.numerics, keys, greedy=self.greedy)
            if got is None or got.argmax < 0:
                return False
            out.argmax[i] = got.argmax
            for q in wanted.get(i, []):
                out.logprobs[(i, q.from_end, q.token)] = got.logprobs[(q.from_end, q.token)]
                if self.greedy:
                    out.greedy[(i, q.from_end)] = got.greedy[q.from_end]
            return True
        got = self.memo.get(seq, self.numerics, embedding=True)
        if got is None:
            return False
        if out.embeddings is None:
            out.embeddings = np.zeros((len(plan.seqs), got.embedding.shape[0]), np.float32)
        out.embeddings[i] = got.embedding
        return True

    def write(self, plan: Plan, i: int, wanted: dict[int, list[Query]], out: RunOutput) -> None:
        seq = plan.seqs[i]
        if plan.causal:
            lp = {
                (q.from_end, q.token): out.logprobs[(i, q.from_end, q.token)]
                for q in wanted.get(i, [])
            }
            qs = wanted.get(i, []) if self.greedy else []
            top = {q.from_end: out.greedy[(i, q.from_end)] for q in qs}
            self.memo.put(seq, self.numerics, Answer(lp, out.argmax[i], greedy=top))
        else:
            self.memo.put(seq, self.numerics, Answer(embedding=out.embeddings[i].copy()))


def mix(exact: RunOutput, cached: RunOutput, threshold: float) -> RunOutput:
    """What a cached run at ``threshold`` would output, from one run at threshold infinity.

    A lookup takes the nearest compatible entry and hits iff its distance <= threshold, so each
    sequence either reuses exactly the maps of the infinite-threshold run or computes exactly."""
    use = [d <= threshold for d in cached.distance]
    lp = {k: (cached.logprobs[k] if use[k[0]] else v) for k, v in exact.logprobs.items()}
    am = [c if u else e for e, c, u in zip(exact.argmax, cached.argmax, use, strict=True)]
    emb = None
    if exact.embeddings is not None:
        emb = np.where(np.array(use)[:, None], cached.embeddings, exact.embeddings)
    dist = [d if u else float("inf") for d, u in zip(cached.distance, use, strict=True)]
    return RunOutput(lp, am, emb, use, float("nan"), dist)
