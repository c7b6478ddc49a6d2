"""Adapter registry: model_type -> adapter. One small module per architecture family."""

from __future__ import annotations

from ..errors import UserError, did_you_mean
from .base import Adapter, Shape, apply_head_maps, apply_maps
from .bert import BertAdapter
from .llama import LlamaAdapter

_ADAPTERS: list[Adapter] = [LlamaAdapter(), BertAdapter()]
REGISTRY: dict[str, Adapter] = {t: a for a in _ADAPTERS for t in a.model_types}


def get_adapter(config) -> Adapter:
    """The adapter for a model config (or a ``model_type`` string, as stored in a DB's manifest)."""
    mt = config if isinstance(config, str) else getattr(config, "model_type", None)
    if mt not in REGISTRY:
        raise UserError(
            f"unsupported architecture '{mt}'{did_you_mean(str(mt), REGISTRY)}; "
            f"supported: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[mt]


__all__ = ["Adapter", "Shape", "apply_head_maps", "apply_maps", "get_adapter", "REGISTRY"]
