"""The model side of the service: validated requests in, results out; runs in one worker thread.

Scoring, reranking and classification are multiple-choice rows run through every tier (the memo, the
prefix tier, map reuse); each result carries ``usage``: its tokens and what each tier did for it.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import models
from ..data import ChoiceRow, TextRow
from ..db.tier_store import TierFolder
from ..inputs import collate
from ..tasks import Plan, RunOutput, choice_scores, plan_rows, run
from ..tiers.memo import ResultMemo
from ..workflows import Session
from .config import ServeConfig

RERANK_PROMPT = (
    "Query: {query}\nDocument: {document}\nIs the document relevant to the query? Answer:"
)
RERANK_CHOICES = (" Yes", " No")
CLASSIFY_TEMPLATE = "{text}\nLabel:"
ENCODER_TEMPERATURE = 0.05  # cosine similarities -> label probabilities (encoders)


class RequestError(ValueError):
    """A request the server refuses (400), with the offending field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def usage(out: RunOutput, seqs: list[int], plan: Plan) -> dict:
    """What the tiers did for one request's sequences (the per-request counterpart of /metrics)."""
    tokens = sum(len(plan.seqs[q]) for q in seqs)
    return {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "attncache": {
            "sequences": len(seqs),
            "memo_hits": sum(out.memo_hit[q] for q in seqs),
            "prefix_tokens_reused": sum(out.prefix_tokens[q] for q in seqs),
            "map_replayed_sequences": sum(out.replayed[q] for q in seqs),
        },
    }


class Engine:
    def __init__(self, session: Session, cfg: ServeConfig):
        self.session, self.cfg = session, cfg
        self.causal = session.causal
        self.max_len = session.max_len
        self.att = None
        if cfg.attach and session.cache is not None:
            att = session.cache.attach(
                session.model, cfg.policy, learn=cfg.learn, device_map_bytes=cfg.device_map_bytes
            )
            self.att = att.__enter__()
        self.prefix = session.prefix_tier(cfg.prefix_bytes) if self.causal else None
        cache = session.cache
        self.folder = None
        if cfg.prefix_dir is not None:  # the exact tiers of an earlier run, checked for this model
            self.folder = TierFolder(
                cfg.prefix_dir, models.fingerprint(session.model, session.tokenizer)
            )
            if self.prefix is not None:
                self.prefix.load(self.folder)
        if cache is not None:
            self.memo = ResultMemo.load(cache.db)
        elif self.folder is not None:
            self.memo = ResultMemo.load_from(self.folder)
        else:
            self.memo = ResultMemo()
        self.queue_depth = 0

    @property
    def learned(self) -> int:
        return self.att.learned if self.att is not None else 0

    def close(self) -> None:
        if self.att is not None:
            self.att.__exit__(None, None, None)
            self.att = None
        if self.session.cache is not None:
            self.session.cache.save_usage()
            if self.cfg.memo:
                self.memo.save(self.session.cache.db)
        if self.folder is not None:
            if self.prefix is not None:
                self.prefix.save(self.folder)
            if self.session.cache is None and self.cfg.memo:
                self.memo.save_to(self.folder)

    # -- validation (in the request handler, so errors name the request's field) -----------------
    def tokens(self, text: str, fld: str) -> list[int]:
        if not text.strip():
            raise RequestError(fld, f"{fld} is empty")
        ids = list(self.session.tokenizer(text)["input_ids"])
        if self.max_len and len(ids) > self.max_len:
            raise RequestError(
                fld, f"{fld} has {len(ids)} tokens; the model takes at most {self.max_len}"
            )
        return ids

    def check_choices(self, prompt: str, choices: list[str], fld: str = "choices") -> None:
        if not self.causal:
            raise RequestError(
                "model", "this endpoint scores continuations: it needs a decoder model"
            )
        if len(choices) < 1:
            raise RequestError(fld, f"{fld} must hold at least one string")
        self.tokens(prompt, "prompt")
        plan = plan_rows(
            [ChoiceRow(prompt, tuple(choices), 0)], self.session.tokenizer, True, self.max_len
        )
        if plan.skipped:
            raise RequestError(fld, plan.skipped[0].split(": ", 1)[-1])

    # -- batches
    # ------------------------------------------------------------------------------------
    def _run(self, plan: Plan) -> RunOutput:
        att = self.att if self.att is not None and not self.att.inert else None
        out = run(
            self.session.model,
            self.session.tokenizer,
            plan,
            batch_size=self.cfg.max_batch,
            attached=att,
            progress=False,
            prefix=self.prefix,
            memo=self.memo if self.cfg.memo else None,
            lookahead=False,  # the next request is unknown: keep what is computed
        )
        if att is not None and att.learning:
            att.learn_pending()
        return out

    @torch.no_grad()
    def score(self, items: list[tuple[str, list[str]]]) -> list[dict]:
        plan = plan_rows(
            [ChoiceRow(p, tuple(c), 0) for p, c in items],
            self.session.tokenizer,
            True,
            self.max_len,
        )
        out = self._run(plan)
        res = []
        for r in plan.rows:
            lp = [sum(out.logprobs[(q.seq, q.from_end, q.token)] for q in qs) for qs in r.queries]
            res.append(
                {
                    "logprobs": lp,
                    "choice": int(np.argmax(choice_scores(r, out))),
                    "cache_hit": any(out.hit[s] for s in r.seqs),
                    "usage": usage(out, r.seqs, plan),
                }
            )
        return res

    def rerank(self, items: list[tuple[str, list[str]]]) -> list[dict]:
        """Per request (query, documents): a relevance score per document."""
        if not self.causal:
            return [self._rerank_encoder(q, docs) for q, docs in items]
        rows = [
            ChoiceRow(RERANK_PROMPT.format(query=q, document=d), RERANK_CHOICES, 0)
            for q, docs in items
            for d in docs
        ]
        plan = plan_rows(rows, self.session.tokenizer, True, self.max_len)
        out = self._run(plan)
        res, k = [], 0
        for _, docs in items:
            mine = plan.rows[k : k + len(docs)]
            k += len(docs)
            scores = [float(_softmax(choice_scores(r, out))[0]) for r in mine]
            res.append(
                {"scores": scores, "usage": usage(out, [q for r in mine for q in r.seqs], plan)}
            )
        return res

    def classify(self, items: list[tuple[str, list[str], str | None]]) -> list[dict]:
        """Per request (text, labels, template): the labels' probabilities."""
        if not self.causal:
            return [self._classify_encoder(t, labels) for t, labels, _ in items]
        rows = [
            ChoiceRow((tpl or CLASSIFY_TEMPLATE).format(text=t), tuple(" " + x for x in labels), 0)
            for t, labels, tpl in items
        ]
        plan = plan_rows(rows, self.session.tokenizer, True, self.max_len)
        out = self._run(plan)
        return [
            {
                "probs": [float(p) for p in _softmax(choice_scores(r, out))],
                "usage": usage(out, r.seqs, plan),
            }
            for r in plan.rows
        ]

    @torch.no_grad()
    def embed(self, texts: list[list[int]]) -> list[dict]:
        if not self.causal:  # through the tiers: memo and map reuse apply
            seqs = [list(t) for t in texts]
            plan = Plan(seqs, [], [], False)
            out = self._run(plan)
            return [
                {
                    "embedding": out.embeddings[i].tolist(),
                    "cache_hit": out.hit[i],
                    "tokens": len(t),
                    "usage": {
                        "prompt_tokens": len(t),
                        "total_tokens": len(t),
                        "attncache": {
                            "memo_hits": int(out.memo_hit[i]),
                            "map_replayed_sequences": int(out.replayed[i]),
                        },
                    },
                }
                for i, t in enumerate(texts)
            ]
        model, pad = self.session.model, self.session.tokenizer.pad_token_id or 0
        inputs = collate(texts, pad, True, next(model.parameters()).device)
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        vec = torch.nn.functional.normalize(
            hidden[:, -1].float(), dim=-1
        )  # left padding: last = real
        att = self.att if self.att is not None and not self.att.inert else None
        hits = att.last_hits if att is not None else [None] * len(texts)
        if att is not None and att.learning:
            att.learn_pending()
        return [
            {
                "embedding": vec[i].tolist(),
                "cache_hit": hits[i] is not None,
                "tokens": len(t),
                "usage": {"prompt_tokens": len(t), "total_tokens": len(t)},
            }
            for i, t in enumerate(texts)
        ]

    def _vectors(self, texts: list[str]) -> tuple[np.ndarray, RunOutput, Plan]:
        plan = plan_rows([TextRow(t) for t in texts], self.session.tokenizer, False, self.max_len)
        out = self._run(plan)
        return out.embeddings[[r.seqs[0] for r in plan.rows]], out, plan

    def _rerank_encoder(self, query: str, docs: list[str]) -> dict:
        vecs, out, plan = self._vectors([query, *docs])
        return {
            "scores": [float(vecs[0] @ v) for v in vecs[1:]],
            "usage": usage(out, list(range(len(plan.seqs))), plan),
        }

    def _classify_encoder(self, text: str, labels: list[str]) -> dict:
        vecs, out, plan = self._vectors([text, *labels])
        sims = np.array([float(vecs[0] @ v) for v in vecs[1:]]) / ENCODER_TEMPERATURE
        return {
            "probs": [float(p) for p in _softmax(sims)],
            "usage": usage(out, list(range(len(plan.seqs))), plan),
        }


def _softmax(x) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()
