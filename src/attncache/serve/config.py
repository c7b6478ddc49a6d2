"""The service's settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..tiers import DEFAULT_PREFIX_BYTES


@dataclass
class ServeConfig:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 30.0
    policy: str | None = None  # None: the DB's default
    attach: bool = True  # False: no map reuse (a baseline for load tests)
    learn: bool = False
    prefix_bytes: int | None = DEFAULT_PREFIX_BYTES
    memo: bool = True  # answer inputs seen before (kept in the DB, saved at shutdown)
    device_map_bytes: int | None = None  # keep the hottest maps on the model's device
    prefix_dir: str | None = (
        None  # keep the prefix tree (and, without a DB, the memo) across restarts
    )
