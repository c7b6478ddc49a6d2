"""Scoring, embeddings and metrics: rows -> model input sequences -> predictions.

The unit of caching is one model input sequence:

- a multiple-choice row whose choices are all one token: one prefill of the prompt; the choices are
  ranked by their next-token log-probability (``logits_to_keep=1``);
- otherwise one prefill per prompt+choice; choices are ranked by the log-likelihood of their tokens
  divided by the choice's length in characters;
- encoders: mean-pooled, L2-normalised last hidden states; a pair row embeds both texts;
- a text row on a decoder: the greedy next token (agreement only).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .data import ChoiceRow, PairRow, Row, TextRow
from .errors import UserError
from .inputs import collate, length_batches
from .progress import Stage


@dataclass
class Query:
    seq: int
    from_end: int  # 1 = the last position's logits
    token: int


@dataclass
class RowPlan:
    kind: str  # "choice1" | "choiceN" | "text" | "pair" | "embed"
    seqs: list[int]
    queries: list[list[Query]] = field(default_factory=list)  # per choice
    norms: list[float] = field(default_factory=list)  # per choice length normaliser
    answer: int | None = None
    label: int | None = None


@dataclass
class Plan:
    seqs: list[list[int]]
    rows: list[RowPlan]
    skipped: list[str]
    causal: bool

    def need(self) -> list[int]:
        """Per sequence, how many trailing positions' logits are needed."""
        n = [1] * len(self.seqs)
        for r in self.rows:
            for qs in r.queries:
                for q in qs:
                    n[q.seq] = max(n[q.seq], q.from_end)
        return n


def plan_rows(rows: list[Row], tokenizer, causal: bool, max_len: int | None) -> Plan:
    seqs: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}

    def seq_id(ids: list[int]) -> int:
        k = tuple(ids)
        if k not in index:
            index[k] = len(seqs)
            seqs.append(ids)
        return index[k]

    def enc(text: str, special: bool = True) -> list[int]:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    plans: list[RowPlan] = []
    skipped: list[str] = []
    for n, row in enumerate(rows):
        try:
            if isinstance(row, ChoiceRow):
                if not causal:
                    raise ValueError("multiple-choice rows need a decoder model")
                p = enc(row.prompt)
                cs = [enc(c, special=False) for c in row.choices]
                if any(len(c) == 0 for c in cs):
                    raise ValueError("a choice encodes to no tokens")
                if all(len(c) == 1 for c in cs):
                    _check_len(len(p), max_len)
                    s = seq_id(p)
                    plans.append(
                        RowPlan(
                            "choice1",
                            [s],
                            [[Query(s, 1, c[0])] for c in cs],
                            [1.0] * len(cs),
                            answer=row.answer,
                        )
                    )
                else:
                    ids, qs = [], []
                    for c in cs:
                        _check_len(len(p) + len(c), max_len)
                        s = seq_id(p + c)
                        ids.append(s)
                        # logits at position t predict token t+1: choice token j sits len(c)-j from
                        # the end
                        qs.append([Query(s, len(c) - j + 1, tok) for j, tok in enumerate(c)])
                    plans.append(
                        RowPlan(
                            "choiceN",
                            ids,
                            qs,
                            [float(len(ch)) for ch in row.choices],
                            answer=row.answer,
                        )
                    )
            elif isinstance(row, TextRow):
                ids = enc(row.text)
                _check_len(len(ids), max_len)
                plans.append(RowPlan("text" if causal else "embed", [seq_id(ids)]))
            elif isinstance(row, PairRow):
                if causal:
                    raise ValueError("pair rows need an encoder model")
                a, b = enc(row.text1), enc(row.text2)
                _check_len(max(len(a), len(b)), max_len)
                plans.append(RowPlan("pair", [seq_id(a), seq_id(b)], label=row.label))
        except ValueError as e:
            skipped.append(f"row {n}: {e}")
    return Plan(seqs, plans, skipped, causal)


def _check_len(n: int, max_len: int | None) -> None:
    if n == 0:
        raise ValueError("encodes to no tokens")
    if max_len is not None and n > max_len:
        raise ValueError(f"{n} tokens is longer than the model's {max_len} positions")


@dataclass
class RunOutput:
    logprobs: dict[tuple[int, int, int], float]  # (seq, from_end, token) -> log p
    argmax: list[int]  # decoders: greedy next token per seq
    embeddings: np.ndarray | None  # encoders: [n_seqs, D]
    hit: list[bool]
    seconds: float
    distance: list[float] = field(
        default_factory=list
    )  # per seq: the hit's predicted distance (inf: none)


@torch.no_grad()
def run(
    model: nn.Module,
    tokenizer,
    plan: Plan,
    batch_size: int = 8,
    attached=None,
    progress: bool = True,
    desc: str = "forward",
    prefix=None,
    seq_ids: list[int] | None = None,
    into: RunOutput | None = None,
) -> RunOutput:
    """Forward every planned sequence once (batched by length) and collect what the rows need.

    ``seq_ids``: only these sequences (the others keep what ``into`` holds, or nothing)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    need = plan.need()
    wanted: dict[int, list[Query]] = {}
    for r in plan.rows:
        for qs in r.queries:
            for q in qs:
                wanted.setdefault(q.seq, []).append(q)
    if into is None:
        into = RunOutput(
            {},
            [0] * len(plan.seqs),
            None,
            [False] * len(plan.seqs),
            0.0,
            [float("inf")] * len(plan.seqs),
        )
    logprobs, argmax, emb = into.logprobs, into.argmax, into.embeddings
    hit, distance, seconds = into.hit, into.distance, into.seconds
    device = next(model.parameters()).device
    todo = list(range(len(plan.seqs))) if seq_ids is None else list(seq_ids)
    bar = Stage(len(todo), desc, progress)
    for picked in length_batches([len(plan.seqs[i]) for i in todo], batch_size):
        batch = [todo[j] for j in picked]
        t0 = time.perf_counter()
        if plan.causal and prefix is not None:
            keep = max(need[i] for i in batch)
            logits, batch_hits = prefix.run([plan.seqs[i] for i in batch], keep, pad, maps=attached)
        else:
            inputs = collate([plan.seqs[i] for i in batch], pad, plan.causal, device)
        if plan.causal:
            if prefix is None:
                keep = max(need[i] for i in batch)
                logits = model(**inputs, logits_to_keep=keep).logits
                batch_hits = attached.last_hits if attached is not None else None
            lp = torch.log_softmax(logits.float(), dim=-1)  # [B, keep, V]
        else:
            out = model(**inputs)
            m = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (out.last_hidden_state.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            batch_hits = attached.last_hits if attached is not None else None
        seconds += time.perf_counter() - t0
        if attached is not None and attached.learning:
            attached.learn_pending()  # outside the timed region: learning is a side job
        if batch_hits is not None:
            for j, i in enumerate(batch):
                hit[i] = batch_hits[j] is not None
                if hit[i]:
                    distance[i] = batch_hits[j].distance
        if plan.causal:
            for j, i in enumerate(batch):
                argmax[i] = int(lp[j, -1].argmax())
                for q in wanted.get(i, []):
                    logprobs[(i, q.from_end, q.token)] = float(lp[j, keep - q.from_end, q.token])
        else:
            if emb is None:
                emb = np.zeros((len(plan.seqs), pooled.shape[-1]), np.float32)
            emb[batch] = pooled.cpu().numpy()
        bar.update(len(batch))
    bar.close()
    into.embeddings, into.seconds = emb, seconds
    return into


def mix(exact: RunOutput, cached: RunOutput, threshold: float) -> RunOutput:
    """What a cached run at ``threshold`` would output, from one run at threshold infinity.

    A lookup takes the nearest compatible entry and hits iff its distance <= threshold, so each
    sequence either reuses exactly the maps of the infinite-threshold run or computes exactly.
    """
    use = [d <= threshold for d in cached.distance]
    lp = {k: (cached.logprobs[k] if use[k[0]] else v) for k, v in exact.logprobs.items()}
    am = [c if u else e for e, c, u in zip(exact.argmax, cached.argmax, use)]
    emb = None
    if exact.embeddings is not None:
        emb = np.where(np.array(use)[:, None], cached.embeddings, exact.embeddings)
    dist = [d if u else float("inf") for d, u in zip(cached.distance, use)]
    return RunOutput(lp, am, emb, use, float("nan"), dist)


def row_prediction(r: RowPlan, out: RunOutput) -> int:
    """The chosen index (choice rows) or greedy token (text rows); -1 for embedding rows."""
    if r.kind in ("choice1", "choiceN"):
        return int(np.argmax(choice_scores(r, out)))
    if r.kind == "text":
        return out.argmax[r.seqs[0]]
    return -1


def predictions(plan: Plan, out: RunOutput) -> list[int]:
    return [row_prediction(r, out) for r in plan.rows]


def choice_scores(r: RowPlan, out: RunOutput) -> list[float]:
    return [
        sum(out.logprobs[(q.seq, q.from_end, q.token)] for q in qs) / n
        for qs, n in zip(r.queries, r.norms)
    ]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties get average ranks)."""
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        return float("nan")
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):  # average ranks of ties
        t = scores == v
        if t.sum() > 1:
            ranks[t] = ranks[t].mean()
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


@dataclass
class Comparison:
    """A cached run against the exact run of the same plan (fields that do not apply are None)."""

    n: int
    n_sequences: int
    hit_rate: float
    agreement: float | None = None  # share of scored rows whose prediction did not change
    accuracy_baseline: float | None = None
    accuracy_cached: float | None = None
    cosine_to_exact_mean: float | None = None
    cosine_to_exact_min: float | None = None
    cosine_to_exact_p01: float | None = None
    pair_auc_exact: float | None = None
    pair_auc_cached: float | None = None
    seconds_exact: float | None = None
    seconds_cached: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def compare(plan: Plan, exact: RunOutput, cached: RunOutput) -> Comparison:
    """Metrics of a cached run against the exact run of the same plan."""
    res = Comparison(
        len(plan.rows),
        len(plan.seqs),
        float(np.mean(cached.hit)) if cached.hit else 0.0,
        seconds_exact=exact.seconds,
        seconds_cached=cached.seconds,
    )
    pe, pc = predictions(plan, exact), predictions(plan, cached)
    scored = [i for i, r in enumerate(plan.rows) if r.kind in ("choice1", "choiceN", "text")]
    if scored:
        res.agreement = float(np.mean([pe[i] == pc[i] for i in scored]))
    choice = [i for i, r in enumerate(plan.rows) if r.answer is not None]
    if choice:
        res.accuracy_baseline = float(np.mean([pe[i] == plan.rows[i].answer for i in choice]))
        res.accuracy_cached = float(np.mean([pc[i] == plan.rows[i].answer for i in choice]))
    if exact.embeddings is not None:
        cos = (exact.embeddings * cached.embeddings).sum(-1)
        res.cosine_to_exact_mean = float(cos.mean())
        res.cosine_to_exact_min = float(cos.min())
        res.cosine_to_exact_p01 = float(np.quantile(cos, 0.01))
        pairs = [r for r in plan.rows if r.kind == "pair"]
        if pairs:
            labels = np.array([r.label for r in pairs])
            se = np.array(
                [float(exact.embeddings[r.seqs[0]] @ exact.embeddings[r.seqs[1]]) for r in pairs]
            )
            sc = np.array(
                [float(cached.embeddings[r.seqs[0]] @ cached.embeddings[r.seqs[1]]) for r in pairs]
            )
            res.pair_auc_exact = auc(se, labels)
            res.pair_auc_cached = auc(sc, labels)
    return res


def require_rows(plan: Plan) -> None:
    if not plan.rows:
        raise UserError("no usable rows: " + "; ".join(plan.skipped[:3]))
