"""attncache: faster prefill-only inference by reusing attention maps (AttnCache, arXiv 2510.25979).

from attncache import AttnCache, load_model model, tok = load_model("smollm2-135m") cache =
AttnCache.build(model, tok, [tok(t).input_ids for t in texts], "my.db") with cache.attach(model,
policy="default"):
    model(**inputs)
print(cache.stats.as_dict())
"""

from .api import Scorer
from .build import BuildConfig, ProjectorConfig
from .cache import AttnCache
from .errors import UserError
from .models import load as load_model
from .runtime import Policy

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
