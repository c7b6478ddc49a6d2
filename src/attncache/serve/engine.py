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
from ..errors import keep_or_warn
from ..inputs import collate
from ..tasks import Plan, RunOptions, RunOutput, Tiers, choice_scores, plan_rows, run
from ..tiers.memo import ResultMemo
from ..workflows import Session
from .checks import (
    Checker,
    RequestError,
    SerialTokenizer,
    classify_row,
    rerank_row,
)
from .config import ServeConfig

ENCODER_TEMPERATURE = 0.05  # cosine similarities -> label probabilities (encoders)


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
        # shared by the request checks (worker threads) and the model thread
        self.tokenizer = SerialTokenizer(session.tokenizer)
        self.check = Checker(self.tokenizer, self.causal, self.max_len, cfg.limits)
        self.att = None
        # a detached server (``--no-cache``) is a plain-model baseline: it reads no answers from
        # the DB and writes nothing into it
        self.db = session.cache.db if cfg.attach and session.cache is not None else None
        if self.db is not None:
            att = session.cache.attach(
                session.model, cfg.policy, learn=cfg.learn, device_map_bytes=cfg.device_map_bytes
            )
            self.att = att.__enter__()
        self.prefix = session.prefix_tier(cfg.prefix_bytes) if self.causal else None
        self.folder = None
        if cfg.prefix_dir is not None:  # the exact tiers of an earlier run, checked for this model
            self.folder = TierFolder(
                cfg.prefix_dir, models.fingerprint(session.model, session.tokenizer)
            )
            if self.prefix is not None:
                self.prefix.load(self.folder)
        if self.db is not None:
            self.memo = ResultMemo.load(self.db)
        elif self.folder is not None and session.cache is None:
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
        if self.db is not None:
            self.session.cache.save_usage()
            if self.cfg.memo:
                keep_or_warn("the new answers", lambda: self.memo.save(self.db))
        if self.folder is not None:
            if self.prefix is not None:
                keep_or_warn("the prefix K/V", lambda: self.prefix.save(self.folder))
            if self.session.cache is None and self.cfg.memo:
                keep_or_warn("the new answers", lambda: self.memo.save_to(self.folder))

    # -- batches
    # ------------------------------------------------------------------------------------
    def _run(self, plan: Plan) -> RunOutput:
        att = self.att if self.att is not None and not self.att.inert else None
        out = run(
            self.session.model,
            self.tokenizer,
            plan,
            RunOptions(batch_size=self.cfg.max_batch, progress=False, lookahead=False),
            tiers=Tiers(
                attached=att, prefix=self.prefix, memo=self.memo if self.cfg.memo else None
            ),
        )
        if att is not None and att.learning:
            att.learn_pending()
        return out

    # Each batch method returns one result per request, in request order: a dict, or the
    # RequestError of that request alone (an input the planner skipped), never a neighbour's.
    @torch.no_grad()
    def score(self, items: list[tuple[str, list[str]]]) -> list[dict | RequestError]:
        plan = plan_rows(
            [ChoiceRow(p, tuple(c), 0) for p, c in items],
            self.tokenizer,
            True,
            self.max_len,
        )
        out = self._run(plan)
        res: list[dict | RequestError] = []
        for n, r in enumerate(plan.by_input(len(items))):
            if r is None:
                res.append(RequestError("choices", plan.error_of(n)))
                continue
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

    def rerank(self, items: list[tuple[str, list[str]]]) -> list[dict | RequestError]:
        """Per request (query, documents): a relevance score per document."""
        if not self.causal:
            return [self._rerank_encoder(q, docs) for q, docs in items]
        rows = [rerank_row(q, d) for q, docs in items for d in docs]
        plan = plan_rows(rows, self.tokenizer, True, self.max_len)
        out = self._run(plan)
        per_input = plan.by_input(len(rows))
        res: list[dict | RequestError] = []
        k = 0
        for _, docs in items:
            mine, first = per_input[k : k + len(docs)], k
            k += len(docs)
            bad = next((j for j, r in enumerate(mine) if r is None), None)
            if bad is not None:
                res.append(RequestError(f"documents[{bad}]", plan.error_of(first + bad)))
                continue
            scores = [float(_softmax(choice_scores(r, out))[0]) for r in mine]
            res.append(
                {"scores": scores, "usage": usage(out, [q for r in mine for q in r.seqs], plan)}
            )
        return res

    def classify(self, items: list[tuple[str, list[str], str | None]]) -> list[dict | RequestError]:
        """Per request (text, labels, template): the labels' probabilities."""
        if not self.causal:
            return [self._classify_encoder(t, labels) for t, labels, _ in items]
        rows = [classify_row(t, labels, tpl) for t, labels, tpl in items]
        plan = plan_rows(rows, self.tokenizer, True, self.max_len)
        out = self._run(plan)
        return [
            RequestError("input", plan.error_of(n))
            if r is None
            else {
                "probs": [float(p) for p in _softmax(choice_scores(r, out))],
                "usage": usage(out, r.seqs, plan),
            }
            for n, r in enumerate(plan.by_input(len(items)))
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
        model, pad = self.session.model, self.tokenizer.pad_token_id or 0
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

    def _vectors(
        self, texts: list[str], fields: list[str]
    ) -> tuple[np.ndarray, RunOutput, Plan] | RequestError:
        plan = plan_rows([TextRow(t) for t in texts], self.tokenizer, False, self.max_len)
        per_input = plan.by_input(len(texts))
        bad = next((n for n, r in enumerate(per_input) if r is None), None)
        if bad is not None:
            return RequestError(fields[bad], plan.error_of(bad))
        out = self._run(plan)
        return out.embeddings[[r.seqs[0] for r in per_input]], out, plan

    def _rerank_encoder(self, query: str, docs: list[str]) -> dict | RequestError:
        got = self._vectors(
            [query, *docs], ["query", *(f"documents[{j}]" for j in range(len(docs)))]
        )
        if isinstance(got, RequestError):
            return got
        vecs, out, plan = got
        return {
            "scores": [float(vecs[0] @ v) for v in vecs[1:]],
            "usage": usage(out, list(range(len(plan.seqs))), plan),
        }

    def _classify_encoder(self, text: str, labels: list[str]) -> dict | RequestError:
        got = self._vectors(
            [text, *labels], ["input", *(f"labels[{j}]" for j in range(len(labels)))]
        )
        if isinstance(got, RequestError):
            return got
        vecs, out, plan = got
        sims = np.array([float(vecs[0] @ v) for v in vecs[1:]]) / ENCODER_TEMPERATURE
        return {
            "probs": [float(p) for p in _softmax(sims)],
            "usage": usage(out, list(range(len(plan.seqs))), plan),
        }


def _softmax(x) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()
