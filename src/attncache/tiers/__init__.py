"""Exact reuse: tiers that skip work without changing any answer."""

from .base import Tier, TierOptions, TierOutput
from .kept import kept_name
from .model_io import supports_prefix
from .prefix import DEFAULT_PREFIX_BYTES, PrefixStats, PrefixTier
from .radix import InsertResult, Match, RadixKV

__all__ = [
    "DEFAULT_PREFIX_BYTES",
    "InsertResult",
    "Match",
    "PrefixStats",
    "PrefixTier",
    "RadixKV",
    "Tier",
    "TierOptions",
    "TierOutput",
    "kept_name",
    "supports_prefix",
]
