"""The service's settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..tiers import DEFAULT_PREFIX_BYTES


@dataclass
class Limits:
    """What one request may hold; past a limit the request gets 413 naming it (TEI's names where
    they exist). Set from ``serve`` flags of the same names."""

    max_client_batch_size: int = 32  # strings in one request (inputs, documents, labels, choices)
    max_request_tokens: int = 32_768  # tokens one request runs, all its rows together
    max_input_chars: int = 100_000  # characters of one string
    max_body_bytes: int = 4 << 20  # the request body

    @classmethod
    def none(cls) -> Limits:
        """No limits: the Python API (``Scorer``), whose caller is trusted."""
        big = 1 << 62
        return cls(big, big, big, big)


@dataclass
class ServeConfig:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 30.0
    policy: str | None = None  # None: the DB's default
    attach: bool = True  # False: no map reuse, and nothing written to the DB (a baseline)
    learn: bool = False
    prefix_bytes: int | None = DEFAULT_PREFIX_BYTES
    memo: bool = True  # answer inputs seen before (kept in the DB, saved at shutdown)
    device_map_bytes: int | None = None  # keep the hottest maps on the model's device
    prefix_dir: str | None = None  # keep the prefix tree (and, without a DB, the memo) here
    limits: Limits | None = None  # None: Limits()

    def __post_init__(self) -> None:
        if self.limits is None:
            self.limits = Limits()
