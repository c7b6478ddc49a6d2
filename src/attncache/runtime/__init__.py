"""Online replay: lookup, the per-batch plan, map sources, replay arithmetic, the patch
lifecycle."""

from .adapters import Adapter, get_adapter
from .attach import Attachment, CacheParts, Learner, MapStats
from .lookup import Hit, Lookup, PresetHits, RecordedHits, RecordingHits, compatible, nearest
from .maps import PreloadedMaps, StoreMaps, read_maps
from .policy import Policy, parse_policy

__all__ = [
    "Adapter",
    "Attachment",
    "CacheParts",
    "Hit",
    "Learner",
    "Lookup",
    "MapStats",
    "Policy",
    "PreloadedMaps",
    "PresetHits",
    "RecordedHits",
    "RecordingHits",
    "StoreMaps",
    "compatible",
    "get_adapter",
    "nearest",
    "parse_policy",
    "read_maps",
]
