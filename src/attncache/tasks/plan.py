"""Rows -> model input sequences: what to run, and which positions' logits each row needs.

The unit of caching is one model input sequence:

- a multiple-choice row whose choices are all one token: one prefill of the prompt; the choices are
  ranked by their next-token log-probability (``logits_to_keep=1``);
- otherwise one prefill per prompt+choice; choices are ranked by the log-likelihood of their tokens
  divided by the choice's length in characters;
- a choice's tokens are what follows the prompt in the encoding of prompt + choice, lm-eval's rule
  (``tokenize.PairEncoder``), never the choice encoded alone;
- encoders: mean-pooled, L2-normalised last hidden states; a pair row embeds both texts;
- a text row on a decoder: the greedy next token (agreement only).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..data import ChoiceRow, PairRow, Row, TextRow
from ..errors import UserError
from .tokenize import PairEncoder


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
    index: int = -1  # the input row this plan came from (its position in what was planned)


@dataclass
class Plan:
    seqs: list[list[int]]
    rows: list[RowPlan]
    skipped: list[str]  # "row N: why", for logs
    causal: bool
    errors: dict[int, str] = field(default_factory=dict)  # input row -> why it has no plan

    def by_input(self, n_inputs: int) -> list[RowPlan | None]:
        """Per input row, its plan, or None where it was skipped (``errors`` says why). Every
        consumer assembles results by this, never by position in ``rows``: one skipped input
        would shift every later result onto another input."""
        out: list[RowPlan | None] = [None] * n_inputs
        for r in self.rows:
            if not 0 <= r.index < n_inputs:
                raise ValueError(f"a row plan names input {r.index} of {n_inputs}")
            out[r.index] = r
        return out

    def need(self) -> list[int]:
        """Per sequence, how many trailing positions' logits are needed."""
        n = [1] * len(self.seqs)
        for r in self.rows:
            for qs in r.queries:
                for q in qs:
                    n[q.seq] = max(n[q.seq], q.from_end)
        return n

    def subset_seqs(self, rows: list[int]) -> list[int]:
        """The sequences of these rows, in the order ``subset`` numbers them."""
        return list(dict.fromkeys(q for r in rows for q in self.rows[r].seqs))

    def subset(self, rows: list[int]) -> Plan:
        """Only these rows, with their sequences renumbered (``subset_seqs`` order)."""
        new = {q: j for j, q in enumerate(self.subset_seqs(rows))}
        renumbered = [
            replace(
                self.rows[r],
                seqs=[new[q] for q in self.rows[r].seqs],
                queries=[[replace(x, seq=new[x.seq]) for x in qs] for qs in self.rows[r].queries],
            )
            for r in rows
        ]
        return Plan([self.seqs[q] for q in new], renumbered, [], self.causal)

    def error_of(self, n: int) -> str:
        return self.errors.get(n, "no plan for this input")


def plan_rows(rows: list[Row], tokenizer, causal: bool, max_len: int | None) -> Plan:
    seqs: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}

    def seq_id(ids: list[int]) -> int:
        k = tuple(ids)
        if k not in index:
            index[k] = len(seqs)
            seqs.append(ids)
        return index[k]

    pairs = PairEncoder(tokenizer)  # choices split as lm-eval splits them

    def whole(text: str) -> list[int]:  # a text row as the tokenizer encodes it (BERT's [SEP])
        return list(tokenizer(text)["input_ids"])

    plans: list[RowPlan] = []
    skipped: list[str] = []
    errors: dict[int, str] = {}
    for n, row in enumerate(rows):
        before = len(plans)
        try:
            if isinstance(row, ChoiceRow):
                if not causal:
                    raise ValueError("multiple-choice rows need a decoder model")
                p, cs = pairs.choices(row.prompt, list(row.choices))
                if not p:
                    raise ValueError("the prompt encodes to no tokens")
                if any(len(c) == 0 for c in cs):
                    raise ValueError("a choice encodes to no tokens")
                if all(len(c) == 1 for c in cs):
                    check_len(len(p), max_len)
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
                    for c in cs:  # all checked first: a skipped row adds no sequence to run
                        check_len(len(p) + len(c) - 1, max_len)  # the last token is not run
                    ids, qs = [], []
                    for c in cs:
                        # logits at position t predict token t+1, so the choice's last token
                        # predicts nothing and is not run (lm-eval's rule); choice token j is
                        # predicted len(c)-j positions from the end
                        s = seq_id(p + c[:-1])
                        ids.append(s)
                        qs.append([Query(s, len(c) - j, tok) for j, tok in enumerate(c)])
                    plans.append(
                        RowPlan(
                            "choiceN",
                            ids,
                            qs,
                            [float(max(len(ch), 1)) for ch in row.choices],  # never 0
                            answer=row.answer,
                        )
                    )
            elif isinstance(row, TextRow):
                ids = whole(row.text)
                check_len(len(ids), max_len)
                plans.append(RowPlan("text" if causal else "embed", [seq_id(ids)]))
            elif isinstance(row, PairRow):
                if causal:
                    raise ValueError("pair rows need an encoder model")
                a, b = whole(row.text1), whole(row.text2)
                check_len(max(len(a), len(b)), max_len)
                plans.append(RowPlan("pair", [seq_id(a), seq_id(b)], label=row.label))
        except ValueError as e:
            skipped.append(f"row {n}: {e}")
            errors[n] = str(e)
        for r in plans[before:]:
            r.index = n
    return shared_positions(Plan(seqs, plans, skipped, causal, errors))


def shared_positions(plan: Plan) -> Plan:
    """Each position's logits asked for once. A position's logits depend only on the tokens up to
    it, so a query whose tokens so far equal an earlier query's reads that query's position (every
    choice's first token follows the same prompt); a sequence no row reads any more is dropped.
    Fewer positions go through the head, and later choices need one trailing position less."""
    # (position, hash of the tokens up to it) -> the queries' (seq, from_end) read there first;
    # hashes, not token tuples, so a long job's keys stay small; equal tokens are checked
    first: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def reader(seq: int, from_end: int) -> tuple[int, int]:
        ids = plan.seqs[seq]
        n = len(ids) - from_end + 1
        seen = first.setdefault((n, hash(tuple(ids[:n]))), [])
        for other, other_end in seen:
            if plan.seqs[other][:n] == ids[:n]:
                return other, other_end
        seen.append((seq, from_end))
        return seq, from_end

    rows = []
    for r in plan.rows:
        if not r.queries:  # embeddings and pairs read whole sequences
            rows.append(r)
            continue
        queries = []
        for qs in r.queries:
            moved = []
            for q in qs:
                seq, from_end = reader(q.seq, q.from_end)
                moved.append(replace(q, seq=seq, from_end=from_end))
            queries.append(moved)
        read = list(dict.fromkeys(q.seq for qs in queries for q in qs))
        rows.append(replace(r, seqs=read, queries=queries))
    used = list(dict.fromkeys(i for r in rows for i in r.seqs))
    if used == list(range(len(plan.seqs))):
        return replace(plan, rows=rows)
    new = {old: k for k, old in enumerate(used)}
    renumbered = [
        replace(
            r,
            seqs=[new[i] for i in r.seqs],
            queries=[[replace(q, seq=new[q.seq]) for q in qs] for qs in r.queries],
        )
        for r in rows
    ]
    return replace(plan, seqs=[plan.seqs[i] for i in used], rows=renumbered)


def check_len(n: int, max_len: int | None) -> None:
    if n == 0:
        raise ValueError("encodes to no tokens")
    if max_len is not None and n > max_len:
        raise ValueError(f"{n} tokens is longer than the model's {max_len} positions")


def require_rows(plan: Plan) -> None:
    if not plan.rows:
        raise UserError("no usable rows: " + "; ".join(plan.skipped[:3]))
