"""The HTTP app: the endpoints (``routes.py``) over one engine and batcher, a bound on body sizes,
and errors that are always a JSON body naming the field (or the limit).

Bad requests get 400 (or 413 past a configured limit, 422 for a malformed body) and the server
keeps serving; anything unforeseen is a 500 with a JSON body, never a bare one. Every answer
carries ``usage``: tokens and what each tier did for it. OpenAPI docs: ``/docs``.
"""

from __future__ import annotations

import json
import logging

from ..errors import UserError
from ..workflows import Session, SessionOptions
from .batcher import Batcher
from .config import ServeConfig
from .engine import Engine
from .metrics import Metrics

log = logging.getLogger("attncache.serve")


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` (declared or streamed) gets 413 before any
    parsing; the body is read once here and handed on."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await _send_json(
                    send, 400, "content-length", "content-length is not a number"
                )
            if too_big:
                return await self._refuse(send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not msg.get("more_body"):
                break
        body, given = b"".join(chunks), False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        msg = f"the request body is over max_body_bytes ({self.max_bytes})"
        await _send_json(send, 413, "max_body_bytes", msg)


async def _send_json(send, status: int, fld: str, msg: str) -> None:
    body = json.dumps({"error": {"field": fld, "message": msg}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(session: Session, cfg: ServeConfig | None = None):
    """The FastAPI app. ``session``: a model, with or without a map DB
    (``workflows.Session.open``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from .routes import ENDPOINTS, Refused, Service, error

    cfg = cfg or ServeConfig()
    metrics = Metrics()
    engine = Engine(session, cfg)
    batcher = Batcher(engine, cfg, metrics)
    model_name = session.cache.manifest["model"]["name"] if session.cache else "model"
    svc = Service(engine, batcher, metrics, cfg, model_name)

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

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused):
        return exc.response

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

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, "path", f"{request.url.path}: {exc.detail}")

    @app.exception_handler(Exception)
    async def unforeseen(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        metrics.request(request.url.path, 500)
        return error(500, "server", f"{type(exc).__name__}: {exc}")

    for add in ENDPOINTS:
        add(app, svc)
    app.add_middleware(BodyLimit, max_bytes=cfg.limits.max_body_bytes)
    return app


def serve(
    db: str | None,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    cfg: ServeConfig | None = None,
    opening: SessionOptions | None = None,
) -> None:
    """Run the app in uvicorn. ``db`` None: ``model_name`` with the exact tiers only;
    ``opening``: how the model loads and the DB opens (device, dtype, the DB's byte cap)."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs the 'serve' extra: pip install 'attncache[serve]'") from None
    session = Session.open(db, model_name, opening)
    uvicorn.run(create_app(session, cfg), host=host, port=port, log_level="warning")
