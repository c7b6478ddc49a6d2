"""Checking a request before it is queued: the same rows the engine will run are planned here, so
what passes validation runs, and what would be skipped is refused naming its own field.

Runs in a worker thread (tokenizing a long body must not stall the event loop); the tokenizer is
shared with the model thread behind a lock (fast tokenizers are not safe to call from two threads
at once)."""

from __future__ import annotations

import re
import threading

from ..data import ChoiceRow, TextRow
from ..tasks import plan_rows
from .config import Limits

RERANK_PROMPT = (
    "Query: {query}\nDocument: {document}\nIs the document relevant to the query? Answer:"
)
RERANK_CHOICES = (" Yes", " No")
CLASSIFY_TEMPLATE = "{text}\nLabel:"


def render(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` of ``values`` replaced, in one pass; every other
    character, braces included, is literal. Not ``str.format``: a user's template must not run
    format specs or attribute lookups, and a value that itself holds ``{document}`` stays text."""
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)


def rerank_row(query: str, document: str) -> ChoiceRow:
    """The row a (query, document) pair runs as: validation plans this same row."""
    return ChoiceRow(render(RERANK_PROMPT, query=query, document=document), RERANK_CHOICES, 0)


def classify_row(text: str, labels: list[str], template: str | None) -> ChoiceRow:
    return ChoiceRow(
        render(template or CLASSIFY_TEMPLATE, text=text), tuple(" " + x for x in labels), 0
    )


class RequestError(ValueError):
    """A request the server refuses (400), with the offending field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


class LimitError(RequestError):
    """A request over a configured limit (413); ``field`` names the limit."""


class SerialTokenizer:
    """A tokenizer callable from several threads: calls are serialised, attributes pass through."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


class Checker:
    def __init__(self, tokenizer, causal: bool, max_len: int | None, limits: Limits):
        self.tokenizer, self.causal, self.max_len, self.limits = tokenizer, causal, max_len, limits

    # -- limits -----------------------------------------------------------------------------------
    def count(self, items: list, fld: str) -> None:
        if not items:
            raise RequestError(fld, f"{fld} must hold at least one string")
        n = self.limits.max_client_batch_size
        if len(items) > n:
            raise LimitError(
                "max_client_batch_size",
                f"{fld} holds {len(items)} strings; max_client_batch_size is {n}",
            )

    def text(self, value: str, fld: str, empty_ok: bool = False) -> None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(fld, f"{fld} is not valid Unicode text (a lone surrogate)") from None
        n = self.limits.max_input_chars
        if len(value) > n:
            raise LimitError(
                "max_input_chars", f"{fld} has {len(value)} characters; max_input_chars is {n}"
            )
        if not empty_ok and not value.strip():
            raise RequestError(fld, f"{fld} is empty")

    def tokens(self, n_tokens: int) -> None:
        cap = self.limits.max_request_tokens
        if n_tokens > cap:
            raise LimitError(
                "max_request_tokens",
                f"the request runs {n_tokens} tokens; max_request_tokens is {cap}",
            )

    # -- per endpoint -----------------------------------------------------------------------------
    def _rows(self, rows: list, fields: list[str]) -> None:
        """Plan ``rows`` as the engine will: the first skipped one is refused by its field."""
        plan = plan_rows(rows, self.tokenizer, self.causal, self.max_len)
        for n, r in enumerate(plan.by_input(len(rows))):
            if r is None:
                raise RequestError(fields[n], f"{fields[n]}: {plan.error_of(n)}")
        self.tokens(sum(len(q) for q in plan.seqs))

    def embeddings(self, texts: list[str], fld: str, listed: bool) -> list[list[int]]:
        """Token ids per text (the engine embeds exactly these)."""
        self.count(texts, fld)
        names = [f"{fld}[{i}]" if listed else fld for i in range(len(texts))]
        for t, name in zip(texts, names, strict=True):
            self.text(t, name)
        ids = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        for i, name in zip(ids, names, strict=True):
            if not i:
                raise RequestError(name, f"{name} encodes to no tokens")
            if self.max_len and len(i) > self.max_len:
                raise RequestError(
                    name, f"{name} has {len(i)} tokens; the model takes at most {self.max_len}"
                )
        self.tokens(sum(len(i) for i in ids))
        return ids

    def _decoder(self) -> None:
        if not self.causal:
            raise RequestError(
                "model", "this endpoint scores continuations: it needs a decoder model"
            )

    def score(self, prompt: str, choices: list[str]) -> None:
        self._decoder()
        self.text(prompt, "prompt")
        self.count(choices, "choices")
        for i, c in enumerate(choices):
            self.text(c, f"choices[{i}]", empty_ok=True)
        self._rows([ChoiceRow(prompt, tuple(choices), 0)], ["choices"])

    def rerank(self, query: str, docs: list[str]) -> None:
        self.text(query, "query")
        self.count(docs, "documents")
        fields = [f"documents[{i}]" for i in range(len(docs))]
        for d, name in zip(docs, fields, strict=True):
            self.text(d, name)
        if self.causal:
            self._rows([rerank_row(query, d) for d in docs], fields)
        else:
            self._rows([TextRow(t) for t in [query, *docs]], ["query", *fields])

    def classify(self, texts: list[str], labels: list[str], template: str | None, listed: bool):
        self.count(texts, "input")
        self.count(labels, "labels")
        if len(labels) < 2:
            raise RequestError("labels", "labels must hold at least two strings")
        if template is not None:
            self.text(template, "template")
            if "{text}" not in template:
                raise RequestError("template", "template must contain {text}")
        fields = [f"input[{i}]" if listed else "input" for i in range(len(texts))]
        for t, name in zip(texts, fields, strict=True):
            self.text(t, name)
        for i, x in enumerate(labels):
            self.text(x, f"labels[{i}]")
        if self.causal:
            self._rows([classify_row(t, labels, template) for t in texts], fields)
        else:
            label_fields = [f"labels[{i}]" for i in range(len(labels))]
            self._rows([TextRow(t) for t in [*texts, *labels]], fields + label_fields)
