"""The HTTP service: OpenAI-shaped embeddings, multiple-choice scoring, health and Prometheus
metrics.

Requests are batched dynamically: the first request in the queue opens a batch, which closes when it
holds ``max_batch`` requests or ``max_wait_ms`` has passed. One worker thread runs the model (a
model is not safe to call from several threads); the event loop only queues and answers. The queue
is bounded: when it is full a request gets 503 at once (backpressure), and a request that waits
longer than ``timeout_s`` gets 504. Bad requests get 400/422 with a JSON error naming the field; the
server keeps serving.

Embeddings: encoders return the mean of the last hidden states over real tokens; decoders return the
last token's final hidden state (after the final norm). Both are L2-normalised.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations of the request
# models
# defined inside create_app at run time.
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import ChoiceRow
from .errors import UserError
from .inputs import collate
from .tasks import choice_scores, plan_rows, run
from .tiers import DEFAULT_PREFIX_BYTES
from .workflows import Session

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class ServeConfig:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 30.0
    policy: str | None = None  # None: the DB's default
    attach: bool = True  # False: the plain model (baseline for load tests)
    learn: bool = False
    prefix_bytes: int | None = DEFAULT_PREFIX_BYTES


class RequestError(ValueError):
    """A request the server refuses (400), with the offending field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass
class Histogram:
    buckets: tuple
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.total}",
            f"{name}_count {self.n}",
        ]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            if seconds is not None:
                self.latency.observe(seconds)

    def batch_size(self, n: int) -> None:
        with self._lock:
            self.batch.observe(n)

    def render(self, engine: "Engine") -> str:
        st = engine.session.cache.stats.as_dict()
        info = engine.session.cache.store
        lines = ["# TYPE attncache_requests_total counter"]
        with self._lock:
            lines += [
                f'attncache_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                for (e, c), n in sorted(self.requests.items())
            ]
            lines += self.latency.lines("attncache_request_seconds") + self.batch.lines(
                "attncache_batch_size"
            )
        for k, kind in (
            ("lookups", "counter"),
            ("hits", "counter"),
            ("misses", "counter"),
            ("layer_maps_reused", "counter"),
        ):
            lines += [f"# TYPE attncache_{k}_total {kind}", f"attncache_{k}_total {st[k]}"]
        lines += [
            "# TYPE attncache_store_bytes gauge",
            f"attncache_store_bytes {info.nbytes}",
            "# TYPE attncache_store_entries gauge",
            f"attncache_store_entries {len(info)}",
            "# TYPE attncache_learned_total counter",
            f"attncache_learned_total {engine.learned}",
            "# TYPE attncache_queue_depth gauge",
            f"attncache_queue_depth {engine.queue_depth}",
        ]
        return "\n".join(lines) + "\n"


class Engine:
    """The model side: validated requests in, results out; runs in one worker thread."""

    def __init__(self, session: Session, cfg: ServeConfig):
        self.session, self.cfg = session, cfg
        self.causal = session.cache.adapter.causal
        self.max_len = session.max_len
        self.att = None
        if cfg.attach:
            self.att = session.cache.attach(session.model, cfg.policy, learn=cfg.learn)
            self.att.__enter__()
        self.prefix = session.prefix_tier(cfg.prefix_bytes) if self.causal else None
        self.queue_depth = 0

    @property
    def learned(self) -> int:
        return self.att.learned if self.att is not None else 0

    def close(self) -> None:
        if self.att is not None:
            self.att.__exit__(None, None, None)
            self.att = None
        self.session.cache.save_usage()

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

    def check_score(self, prompt: str, choices: list[str]) -> None:
        if not self.causal:
            raise RequestError(
                "model", "/v1/score needs a decoder model; this DB is for an encoder"
            )
        if len(choices) < 1:
            raise RequestError("choices", "choices must hold at least one string")
        self.tokens(prompt, "prompt")
        plan = plan_rows(
            [ChoiceRow(prompt, tuple(choices), 0)], self.session.tokenizer, True, self.max_len
        )
        if plan.skipped:
            raise RequestError("choices", plan.skipped[0].split(": ", 1)[-1])

    # -- batches
    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, items: list[tuple[str, list[str]]]) -> list[dict]:
        rows = [ChoiceRow(p, tuple(c), 0) for p, c in items]
        plan = plan_rows(rows, self.session.tokenizer, True, self.max_len)
        out = run(
            self.session.model,
            self.session.tokenizer,
            plan,
            batch_size=self.cfg.max_batch,
            attached=self.att,
            progress=False,
            prefix=self.prefix,
        )
        res = []
        for r in plan.rows:
            lp = [sum(out.logprobs[(q.seq, q.from_end, q.token)] for q in qs) for qs in r.queries]
            norm = choice_scores(r, out)
            res.append(
                {
                    "logprobs": lp,
                    "choice": int(np.argmax(norm)),
                    "cache_hit": any(out.hit[s] for s in r.seqs),
                }
            )
        return res

    @torch.no_grad()
    def embed(self, texts: list[list[int]]) -> list[dict]:
        model, pad = self.session.model, self.session.tokenizer.pad_token_id or 0
        inputs = collate(texts, pad, self.causal, next(model.parameters()).device)
        if self.causal:
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
            vec = out.hidden_states[-1][
                :, -1
            ]  # left padding: the last position is every row's last token
        else:
            out = model(**inputs)
            m = inputs["attention_mask"].unsqueeze(-1).float()
            vec = (out.last_hidden_state.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        vec = torch.nn.functional.normalize(vec.float(), dim=-1)
        hits = self.att.last_hits if self.att is not None else [None] * len(texts)
        if self.att is not None and self.att.learning:
            self.att.learn_pending()
        return [
            {"embedding": vec[i].tolist(), "cache_hit": hits[i] is not None, "tokens": len(t)}
            for i, t in enumerate(texts)
        ]


class Batcher:
    """Bounded queue + one worker thread; requests of one kind are batched together."""

    def __init__(self, engine: Engine, cfg: ServeConfig, metrics: Metrics):
        self.engine, self.cfg, self.metrics = engine, cfg, metrics
        self.queue: asyncio.Queue | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="attncache-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.cfg.max_queue)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=True)

    async def submit(self, kind: str, payload) -> dict:
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((kind, payload, fut))
        except asyncio.QueueFull:
            raise OverflowError("the request queue is full") from None
        self.engine.queue_depth = self.queue.qsize()
        return await asyncio.wait_for(fut, self.cfg.timeout_s)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.cfg.max_wait_ms / 1000
            while len(batch) < self.cfg.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            self.engine.queue_depth = self.queue.qsize()
            batch = [b for b in batch if not b[2].done()]  # timed out while queued
            for kind in ("score", "embed"):
                part = [b for b in batch if b[0] == kind]
                if not part:
                    continue
                fn = self.engine.score if kind == "score" else self.engine.embed
                self.metrics.batch_size(len(part))
                try:
                    results = await loop.run_in_executor(self.pool, fn, [b[1] for b in part])
                # noqa: BLE001 - reported to each waiting request, the server goes on
                except Exception as e:
                    for b in part:
                        if not b[2].done():
                            b[2].set_exception(e)
                    continue
                for b, r in zip(part, results):
                    if not b[2].done():
                        b[2].set_result(r)


def create_app(session: Session, cfg: ServeConfig | None = None):
    """The FastAPI app. ``session``: an opened DB with its model (``workflows.Session.open``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict, Field

    cfg = cfg or ServeConfig()
    metrics = Metrics()
    engine = Engine(session, cfg)
    batcher = Batcher(engine, cfg, metrics)

    class EmbeddingsIn(BaseModel):
        model_config = ConfigDict(extra="ignore")
        input: str | list[str] = Field(..., description="a string or a list of strings")
        model: str | None = None

    class ScoreIn(BaseModel):
        model_config = ConfigDict(extra="ignore")
        prompt: str
        choices: list[str]

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()
        engine.close()

    app = FastAPI(title="attncache", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    def error(status: int, fld: str, msg: str) -> JSONResponse:
        return JSONResponse({"error": {"field": fld, "message": msg}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid request"}
        parts = [x for x in first.get("loc", []) if x != "body"]
        # the field, then list positions; pydantic's union-member tags ('str', 'list[str]') are
        # dropped
        fld = (
            (str(parts[0]) + "".join(f"[{x}]" for x in parts[1:] if isinstance(x, int)))
            if parts
            else "body"
        )
        metrics.request(request.url.path, 422)
        return error(422, fld, f"{fld}: {first.get('msg')}")

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

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsIn):
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            metrics.request("/v1/embeddings", 400)
            return error(400, "input", "input is an empty list")
        try:
            ids = [
                engine.tokens(t, f"input[{i}]" if isinstance(body.input, list) else "input")
                for i, t in enumerate(texts)
            ]
        except RequestError as e:
            metrics.request("/v1/embeddings", 400)
            return error(400, e.field, str(e))
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
        return {
            "object": "list",
            "model": body.model or session.cache.manifest["model"]["name"],
            "data": data,
            "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok},
        }

    @app.post("/v1/score")
    async def score(body: ScoreIn):
        try:
            engine.check_score(body.prompt, body.choices)
        except RequestError as e:
            metrics.request("/v1/score", 400)
            return error(400, e.field, str(e))
        res, err = await answer("/v1/score", "score", (body.prompt, list(body.choices)))
        return err if err is not None else res

    @app.get("/health")
    async def health():
        return {"status": "ok", "entries": len(session.cache.store), "attached": cfg.attach}

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    return app


def serve(
    db: str,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    cfg: ServeConfig | None = None,
    max_bytes: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs the 'serve' extra: pip install 'attncache[serve]'") from None
    session = Session.open(db, model_name, max_bytes=max_bytes, device=device, dtype=dtype)
    uvicorn.run(create_app(session, cfg), host=host, port=port, log_level="warning")
