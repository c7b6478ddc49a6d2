"""Adapter registry: model_type -> adapter. One small module per architecture family."""

from __future__ import annotations

from ...errors import UserError, did_you_mean
from .base import Adapter, Shape
from .bert import BertAdapter
from .llama import LlamaAdapter

_ADAPTERS: list[Adapter] = [LlamaAdapter(), BertAdapter()]
REGISTRY: dict[str, Adapter] = {t: a for a in _ADAPTERS for t in a.model_types}


def get_adapter(config) -> Adapter:
    """The adapter for a model config (or a ``model_type`` string, as stored in a DB's manifest)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UserError(
            f"unsupported architecture '{model_type}'{did_you_mean(str(model_type), REGISTRY)}; "
            f"supported: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[model_type]


__all__ = ["REGISTRY", "Adapter", "Shape", "get_adapter"]
