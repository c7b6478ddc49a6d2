"""What the server answers, in Python: ``Scorer`` runs score / rerank / classify / embed through
every tier (memo, shared prefixes, map reuse), the same code the endpoints call.

    from attncache import AttnCache, Scorer, load_model
    model, tok = load_model("smollm2-135m")
    with Scorer(model, tok, AttnCache.open("runs/my.db")) as s:          # or no cache: exact tiers
        s.score("Review: a gripping film\\nSentiment:", [" negative", " positive"])
        s.classify(["a gripping film"], ["negative", "positive"], "Review: {text}\\nSentiment:")
"""

from __future__ import annotations

from .cache import AttnCache
from .errors import UserError
from .serve.config import Limits, ServeConfig
from .serve.engine import Engine, RequestError
from .tiers import DEFAULT_PREFIX_BYTES
from .workflows import Session


class Scorer:
    def __init__(
        self,
        model,
        tokenizer,
        cache: AttnCache | None = None,
        policy: str | None = None,
        batch_size: int = 8,
        prefix_bytes: int | None = DEFAULT_PREFIX_BYTES,
        memo: bool = True,
        prefix_dir: str | None = None,
    ):
        """``prefix_dir``: keep the prefix tree (and, without a DB, the memo) there across
        processes, as ``serve --prefix-dir`` does; kept per model and numerics."""
        cfg = ServeConfig(
            max_batch=batch_size,
            policy=policy,
            attach=cache is not None,
            prefix_bytes=prefix_bytes,
            memo=memo,
            prefix_dir=prefix_dir,
            limits=Limits.none(),
        )
        self.engine = Engine(Session(cache, model, tokenizer), cfg)

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Detach from the model and save what the DB should keep (usage counts, memo answers)."""
        self.engine.close()

    def _check(self, fn, *args):
        try:
            return fn(*args)
        except RequestError as e:
            raise UserError(str(e)) from None

    @staticmethod
    def _result(r):
        if isinstance(r, RequestError):
            raise UserError(str(r))
        return r

    def score(self, prompt: str, choices: list[str]) -> dict:
        """Log-probabilities of each continuation, the chosen index, and ``usage`` (as
        /v1/score)."""
        self._check(self.engine.check.score, prompt, list(choices))
        return self._result(self.engine.score([(prompt, list(choices))])[0])

    def rerank(self, query: str, documents: list[str]) -> list[float]:
        """A relevance score per document (as /v1/rerank, unsorted)."""
        self._check(self.engine.check.rerank, query, list(documents))
        return self._result(self.engine.rerank([(query, list(documents))])[0])["scores"]

    def classify(
        self, texts: list[str], labels: list[str], template: str | None = None
    ) -> list[dict]:
        """Per text the labels' probabilities and the most likely label (as /v1/classify)."""
        self._check(self.engine.check.classify, list(texts), list(labels), template, True)
        out = [
            self._result(r)
            for r in self.engine.classify([(t, list(labels), template) for t in texts])
        ]
        return [
            {"label": labels[max(range(len(r["probs"])), key=r["probs"].__getitem__)], **r}
            for r in out
        ]

    def embed(self, texts: list[str]) -> list[list[float]]:
        """L2-normalised embeddings (as /v1/embeddings)."""
        ids = self._check(self.engine.check.embeddings, list(texts), "texts", True)
        return [r["embedding"] for r in self.engine.embed(ids)]
