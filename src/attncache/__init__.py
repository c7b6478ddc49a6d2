"""attncache: faster prefill-only inference by reusing attention maps (AttnCache, arXiv 2510.25979).

from attncache import AttnCache, load_model model, tok = load_model("smollm2-135m") cache =
AttnCache.build(model, tok, [tok(t).input_ids for t in texts], "my.db") with cache.attach(model,
policy="default"):
    model(**inputs)
print(cache.stats.as_dict())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import Scorer
    from .build import BuildConfig, ProjectorConfig
    from .cache import AttnCache
    from .errors import UserError
    from .models import load as load_model
    from .runtime import Policy

# Resolved on first use (PEP 562): ``import attncache.batch.reading`` in a Ray reader task, or
# ``attncache --help``, does not pay for torch and transformers.
_LAZY = {
    "AttnCache": (".cache", "AttnCache"),
    "BuildConfig": (".build", "BuildConfig"),
    "Policy": (".runtime", "Policy"),
    "ProjectorConfig": (".build", "ProjectorConfig"),
    "Scorer": (".api", "Scorer"),
    "UserError": (".errors", "UserError"),
    "load_model": (".models", "load"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'attncache' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


__all__ = [
    "AttnCache",
    "BuildConfig",
    "Policy",
    "ProjectorConfig",
    "Scorer",
    "UserError",
    "load_model",
]
__version__ = "0.1.0"
