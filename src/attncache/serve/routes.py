"""The endpoints, one function each: embeddings (OpenAI), score, rerank (Cohere/vLLM), classify
(vLLM), health, metrics. Each checks its body in a worker thread (``checks.Checker``: the rows the
engine will run, the configured limits), queues it on the batcher and shapes the answer."""

# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations at run time.
import asyncio
import time
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from .batcher import Batcher
from .checks import LimitError, RequestError
from .config import ServeConfig
from .engine import Engine
from .metrics import Metrics
from .schemas import ClassifyIn, EmbeddingsIn, RerankIn, ScoreIn


def error(status: int, fld: str, msg: str) -> JSONResponse:
    return JSONResponse({"error": {"field": fld, "message": msg}}, status_code=status)


class Refused(Exception):
    """A request answered with ``response`` (an error) instead of a result; the app's handler
    for it returns the response."""

    def __init__(self, response: JSONResponse):
        self.response = response


@dataclass
class Service:
    engine: Engine
    batcher: Batcher
    metrics: Metrics
    cfg: ServeConfig
    model_name: str

    def refusal(self, endpoint: str, e: RequestError) -> Refused:
        status = 413 if isinstance(e, LimitError) else 400
        self.metrics.request(endpoint, status)
        return Refused(error(status, e.field, str(e)))

    async def checked(self, endpoint: str, fn, *args):
        """``fn(*args)`` (a ``Checker`` method: it tokenizes) off the event loop."""
        try:
            return await run_in_threadpool(fn, *args)
        except RequestError as e:
            raise self.refusal(endpoint, e) from None

    async def answer(self, endpoint: str, kind: str, payload) -> dict:
        t0 = time.perf_counter()
        try:
            res = await self.batcher.submit(kind, payload)
        except RequestError as e:  # the engine could not run this request's own input
            raise self.refusal(endpoint, e) from None
        except OverflowError as e:
            self.metrics.request(endpoint, 503)
            raise Refused(error(503, "queue", f"{e}; retry later")) from None
        except TimeoutError:
            self.metrics.request(endpoint, 504)
            raise Refused(
                error(504, "timeout", f"no answer within {self.cfg.timeout_s} s")
            ) from None
        self.metrics.request(endpoint, 200, time.perf_counter() - t0)
        return res

    async def answers(self, endpoint: str, kind: str, payloads: list) -> list[dict]:
        got = await asyncio.gather(
            *(self.answer(endpoint, kind, p) for p in payloads), return_exceptions=True
        )
        for g in got:
            if isinstance(g, BaseException):
                raise g
        return got


def model_of(body, svc: Service) -> str:
    """The ``model`` a request named, echoed back only if it is text JSON can carry."""
    name = getattr(body, "model", None)
    if not name:
        return svc.model_name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: the response could not be encoded
        return svc.model_name
    return name


def texts_of(value) -> tuple[list[str], bool]:
    return ([value], False) if isinstance(value, str) else (list(value), True)


def add_embeddings(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/embeddings", summary="Embeddings (OpenAI shape)")
    async def embeddings(body: EmbeddingsIn):
        texts, listed = texts_of(body.input)
        ids = await svc.checked(
            "/v1/embeddings", svc.engine.check.embeddings, texts, "input", listed
        )
        results = await svc.answers("/v1/embeddings", "embed", ids)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": r["embedding"],
                "cache_hit": r["cache_hit"],
            }
            for i, r in enumerate(results)
        ]
        n_tok = sum(r["tokens"] for r in results)
        tiers = [r["usage"].get("attncache", {}) for r in results]
        return {
            "object": "list",
            "model": model_of(body, svc),
            "data": data,
            "usage": {
                "prompt_tokens": n_tok,
                "total_tokens": n_tok,
                "attncache": {
                    k: sum(t.get(k, 0) for t in tiers)
                    for k in ("memo_hits", "map_replayed_sequences")
                },
            },
        }


def add_score(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/score", summary="Log-probabilities of continuations of a prompt")
    async def score(body: ScoreIn):
        await svc.checked("/v1/score", svc.engine.check.score, body.prompt, body.choices)
        return await svc.answer("/v1/score", "score", (body.prompt, list(body.choices)))


def add_rerank(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/rerank", summary="Relevance of documents to a query (Cohere / vLLM shape)")
    async def rerank(body: RerankIn):
        docs = body.documents if body.documents is not None else (body.texts or [])
        await svc.checked("/v1/rerank", svc.engine.check.rerank, body.query, docs)
        res = await svc.answer("/v1/rerank", "rerank", (body.query, list(docs)))
        order = sorted(range(len(docs)), key=lambda i: -res["scores"][i])[: body.top_n or len(docs)]
        results = [
            {
                "index": i,
                "relevance_score": res["scores"][i],
                **({"document": {"text": docs[i]}} if body.return_documents else {}),
            }
            for i in order
        ]
        return {"model": model_of(body, svc), "results": results, "usage": res["usage"]}


def add_classify(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/classify", summary="Label probabilities of texts (vLLM shape)")
    async def classify(body: ClassifyIn):
        texts, listed = texts_of(body.input)
        check = svc.engine.check.classify
        await svc.checked("/v1/classify", check, texts, body.labels, body.template, listed)
        payloads = [(t, list(body.labels), body.template) for t in texts]
        results = await svc.answers("/v1/classify", "classify", payloads)
        data = [
            {
                "index": i,
                "label": body.labels[max(range(len(r["probs"])), key=r["probs"].__getitem__)],
                "probs": r["probs"],
                "num_classes": len(body.labels),
                "usage": r["usage"],
            }
            for i, r in enumerate(results)
        ]
        tokens = sum(d["usage"]["prompt_tokens"] for d in data)
        return {
            "object": "list",
            "model": model_of(body, svc),
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def add_status(app: FastAPI, svc: Service) -> None:
    engine = svc.engine
    session = engine.session

    @app.get("/health", summary="Liveness and what is loaded")
    async def health():
        return {
            "status": "ok",
            "entries": len(session.cache.store) if session.cache else 0,
            "attached": engine.att is not None,
            "device": session.device,
            "dtype": session.dtype,
            "memo_entries": len(engine.memo),
            "prefix_cache": engine.prefix is not None,
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def prom():
        return PlainTextResponse(svc.metrics.render(engine), media_type="text/plain; version=0.0.4")


ENDPOINTS = (add_embeddings, add_score, add_rerank, add_classify, add_status)
