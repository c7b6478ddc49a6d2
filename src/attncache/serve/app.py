"""The HTTP routes: embeddings (OpenAI), score, rerank (Cohere/vLLM), classify (vLLM), health,
metrics.

Bad requests get 400/422 with a JSON error naming the field; the server keeps serving. Every answer
carries ``usage``: tokens and what each tier did for it (memo hits, prefix tokens reused, maps).
OpenAPI docs with an example per endpoint are at ``/docs``.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations of the request
# models defined inside create_app at run time.
import asyncio
import time

from ..errors import UserError
from ..workflows import Session
from .batcher import Batcher
from .config import ServeConfig
from .engine import Engine, RequestError
from .metrics import Metrics


def create_app(session: Session, cfg: ServeConfig | None = None):
    """The FastAPI app. ``session``: a model, with or without a map DB
    (``workflows.Session.open``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict, Field

    cfg = cfg or ServeConfig()
    metrics = Metrics()
    engine = Engine(session, cfg)
    batcher = Batcher(engine, cfg, metrics)
    model_name = session.cache.manifest["model"]["name"] if session.cache else "model"

    class EmbeddingsIn(BaseModel):
        model_config = ConfigDict(
            extra="ignore",
            json_schema_extra={"examples": [{"input": ["a gripping film", "dull and too long"]}]},
        )
        input: str | list[str] = Field(..., description="a string or a list of strings")
        model: str | None = None

    class ScoreIn(BaseModel):
        model_config = ConfigDict(
            extra="ignore",
            json_schema_extra={
                "examples": [
                    {
                        "prompt": "Review: a gripping film\nSentiment:",
                        "choices": [" negative", " positive"],
                    }
                ]
            },
        )
        prompt: str
        choices: list[str]

    class RerankIn(BaseModel):
        model_config = ConfigDict(
            extra="ignore",
            json_schema_extra={
                "examples": [
                    {
                        "query": "what is the capital of France?",
                        "documents": ["Paris is the capital of France.", "Berlin is in Germany."],
                        "top_n": 2,
                    }
                ]
            },
        )
        query: str
        documents: list[str] | None = Field(None, description="the texts to rank (Cohere, vLLM)")
        texts: list[str] | None = Field(None, description="the same, as TEI names it")
        top_n: int | None = Field(None, ge=1)
        return_documents: bool = False
        model: str | None = None

    class ClassifyIn(BaseModel):
        model_config = ConfigDict(
            extra="ignore",
            json_schema_extra={
                "examples": [
                    {
                        "input": ["a gripping film"],
                        "labels": ["negative", "positive"],
                        "template": "Review: {text}\nSentiment:",
                    }
                ]
            },
        )
        input: str | list[str]
        labels: list[str] = Field(..., description="the classes; probabilities come in this order")
        template: str | None = Field(
            None, description="how a text becomes a prompt; {text} marks it"
        )
        model: str | None = None

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()
        engine.close()

    app = FastAPI(
        title="attncache",
        lifespan=lifespan,
        description="Prefill-only inference with exact reuse (memo, shared prefixes) and "
        "bounded map reuse. Every answer's `usage` says what each tier did for it.",
    )
    app.state.engine, app.state.metrics = engine, metrics

    def error(status: int, fld: str, msg: str) -> JSONResponse:
        return JSONResponse({"error": {"field": fld, "message": msg}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid request"}
        parts = [x for x in first.get("loc", []) if x != "body"]
        # the field, then list positions; pydantic's union-member tags ('str', 'list[str]') go
        fld = (
            (str(parts[0]) + "".join(f"[{x}]" for x in parts[1:] if isinstance(x, int)))
            if parts
            else "body"
        )
        metrics.request(request.url.path, 422)
        return error(422, fld, f"{fld}: {first.get('msg')}")

    def refuse(endpoint: str, e: RequestError) -> JSONResponse:
        metrics.request(endpoint, 400)
        return error(400, e.field, str(e))

    async def answer(endpoint: str, kind: str, payload):
        t0 = time.perf_counter()
        try:
            res = await batcher.submit(kind, payload)
        except OverflowError as e:
            metrics.request(endpoint, 503)
            return None, error(503, "queue", f"{e}; retry later")
        except TimeoutError:
            metrics.request(endpoint, 504)
            return None, error(504, "timeout", f"no answer within {cfg.timeout_s} s")
        except (UserError, RuntimeError, ValueError) as e:
            metrics.request(endpoint, 500)
            return None, error(500, "server", str(e))
        metrics.request(endpoint, 200, time.perf_counter() - t0)
        return res, None

    def texts_of(value, fld: str) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise RequestError(fld, f"{fld} is an empty list")
        for i, t in enumerate(texts):
            engine.tokens(t, f"{fld}[{i}]" if isinstance(value, list) else fld)
        return texts

    @app.post("/v1/embeddings", summary="Embeddings (OpenAI shape)")
    async def embeddings(body: EmbeddingsIn):
        try:
            texts = texts_of(body.input, "input")
        except RequestError as e:
            return refuse("/v1/embeddings", e)
        ids = [engine.tokens(t, "input") for t in texts]
        results = await asyncio.gather(*(answer("/v1/embeddings", "embed", x) for x in ids))
        bad = next((err for _, err in results if err is not None), None)
        if bad is not None:
            return bad
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": r["embedding"],
                "cache_hit": r["cache_hit"],
            }
            for i, (r, _) in enumerate(results)
        ]
        n_tok = sum(r["tokens"] for r, _ in results)
        tiers = [r["usage"].get("attncache", {}) for r, _ in results]
        return {
            "object": "list",
            "model": body.model or model_name,
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

    @app.post("/v1/score", summary="Log-probabilities of continuations of a prompt")
    async def score(body: ScoreIn):
        try:
            engine.check_choices(body.prompt, body.choices)
        except RequestError as e:
            return refuse("/v1/score", e)
        res, err = await answer("/v1/score", "score", (body.prompt, list(body.choices)))
        return err if err is not None else res

    @app.post("/v1/rerank", summary="Relevance of documents to a query (Cohere / vLLM shape)")
    async def rerank(body: RerankIn):
        docs = body.documents if body.documents is not None else body.texts
        try:
            if not body.query.strip():
                raise RequestError("query", "query is empty")
            if not docs:
                raise RequestError("documents", "documents must hold at least one string")
            for i, d in enumerate(docs):
                engine.tokens(f"Query: {body.query}\nDocument: {d}", f"documents[{i}]")
        except RequestError as e:
            return refuse("/v1/rerank", e)
        res, err = await answer("/v1/rerank", "rerank", (body.query, list(docs)))
        if err is not None:
            return err
        order = sorted(range(len(docs)), key=lambda i: -res["scores"][i])[: body.top_n or len(docs)]
        results = [
            {
                "index": i,
                "relevance_score": res["scores"][i],
                **({"document": {"text": docs[i]}} if body.return_documents else {}),
            }
            for i in order
        ]
        return {"model": body.model or model_name, "results": results, "usage": res["usage"]}

    @app.post("/v1/classify", summary="Label probabilities of texts (vLLM shape)")
    async def classify(body: ClassifyIn):
        try:
            texts = texts_of(body.input, "input")
            if len(body.labels) < 2:
                raise RequestError("labels", "labels must hold at least two strings")
            if body.template is not None and "{text}" not in body.template:
                raise RequestError("template", "template must contain {text}")
            if engine.causal:
                for t in texts:
                    prompt = (body.template or "{text}\nLabel:").format(text=t)
                    engine.check_choices(prompt, [" " + x for x in body.labels], "labels")
        except RequestError as e:
            return refuse("/v1/classify", e)
        results = await asyncio.gather(
            *(
                answer("/v1/classify", "classify", (t, list(body.labels), body.template))
                for t in texts
            )
        )
        bad = next((err for _, err in results if err is not None), None)
        if bad is not None:
            return bad
        data = [
            {
                "index": i,
                "label": body.labels[max(range(len(r["probs"])), key=r["probs"].__getitem__)],
                "probs": r["probs"],
                "num_classes": len(body.labels),
                "usage": r["usage"],
            }
            for i, (r, _) in enumerate(results)
        ]
        tokens = sum(d["usage"]["prompt_tokens"] for d in data)
        return {
            "object": "list",
            "model": body.model or model_name,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

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
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    return app


def serve(
    db: str | None,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    cfg: ServeConfig | None = None,
    max_bytes: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    """Run the app in uvicorn. ``db`` None: ``model_name`` with the exact tiers only."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs the 'serve' extra: pip install 'attncache[serve]'") from None
    session = Session.open(db, model_name, max_bytes=max_bytes, device=device, dtype=dtype)
    uvicorn.run(create_app(session, cfg), host=host, port=port, log_level="warning")
