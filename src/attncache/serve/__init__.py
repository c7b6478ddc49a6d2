"""The HTTP service (``attncache serve``): the endpoints users of TEI and vLLM expect, over the
tiers."""

from .app import create_app, serve
from .config import ServeConfig
from .engine import Engine, RequestError

__all__ = ["Engine", "RequestError", "ServeConfig", "create_app", "serve"]
