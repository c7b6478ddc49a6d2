"""``AttnCache``: the facade a notebook user calls — build, open, attach, stats — over db/, build/,
runtime/."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import models
from .build import online
from .build.convert import compress as compress_db
from .build.pipeline import BuildConfig, BuildInputs, BuildRunOptions
from .build.pipeline import build as build_db
from .db import Database, DbInfo, Templates, describe, migrate
from .errors import UserError
from .runtime import (
    Attachment,
    CacheParts,
    Hit,
    Lookup,
    MapStats,
    Policy,
    StoreMaps,
    compatible,
    get_adapter,
)
from .runtime.maps import DeviceMapCache
from .runtime.policy import parse_policy


class AttnCache:
    def __init__(self, db: Database):
        self.db = db
        self.adapter = get_adapter(db.model.model_type)
        self.stats = MapStats()
        self._templates: Templates | None = None  # tried in this process only (calibration)

    # -- build and open ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer,
        sequences: Sequence[Sequence[int]],
        out: str | Path,
        cfg: BuildConfig | None = None,
        progress: bool = True,
        force: bool = False,
        groups: Sequence[int] | None = None,
    ) -> AttnCache:
        """Record maps of ``sequences`` (token id lists, or strings the tokenizer encodes) on
        ``model`` and write the DB ``out``."""
        sequences = [tokenizer(s)["input_ids"] if isinstance(s, str) else s for s in sequences]
        inputs = BuildInputs(sequences, groups)
        build_db(model, tokenizer, inputs, out, cfg, BuildRunOptions(progress, force))
        return cls.open(out)

    @classmethod
    def open(
        cls, folder: str | Path, max_bytes: int | None = None, eviction: str | None = None
    ) -> AttnCache:
        """Open a DB for reading; ``max_bytes``/``eviction`` override the stored cap for inserts."""
        return cls(Database.open(folder, max_bytes, eviction))

    @staticmethod
    def verify(folder: str | Path) -> list[str]:
        return Database.verify(folder)

    @staticmethod
    def migrate(folder: str | Path) -> bool:
        return migrate(folder)

    def compress(
        self,
        out: str | Path,
        codec: str,
        sparse_eps: float | None = None,
        progress: bool = True,
        force: bool = False,
    ) -> AttnCache:
        compress_db(self.db, out, codec, sparse_eps, progress, force)
        return AttnCache.open(out)

    # -- what the DB holds ------------------------------------------------------------------------
    folder = property(lambda self: self.db.folder)
    manifest = property(lambda self: self.db.manifest)
    store = property(lambda self: self.db.store)
    projector = property(lambda self: self.db.projector)
    index = property(lambda self: self.db.index)
    vectors = property(lambda self: self.db.vectors)
    shape = property(lambda self: self.db.shape)
    allow_crop = property(lambda self: self.db.allow_crop)
    threshold = property(lambda self: self.db.threshold)
    default_layers = property(lambda self: list(self.db.policy_json["layers"]))
    head_distance = property(lambda self: self.db.head_distance)

    @property
    def templates(self) -> Templates | None:
        return self._templates if self._templates is not None else self.db.templates

    def use_templates(self, templates: Templates | None) -> None:
        """Use ``templates`` in this process (not stored; calibration tries them before keeping
        any)."""
        self._templates = templates

    def set_templates(
        self, templates: Templates | None, info: dict | None = None, lock_wait_s: float = 10.0
    ) -> None:
        """Store (or, with None, drop) template maps in one commit."""
        self.db.commit_templates(templates, info, lock_wait_s)

    def policy(self, spec: str | Policy | None = None) -> Policy:
        if isinstance(spec, Policy):
            return spec
        t = self.templates
        return parse_policy(
            spec,
            self.shape.n_layers,
            self.shape.n_heads,
            self.db.policy_json,
            self.head_distance,
            t.heads if t is not None else None,
        )

    def compatible(self, entry: int, length: int) -> bool:
        return compatible(self.db, entry, length)

    def lookup(
        self, feats: np.ndarray, lengths: Sequence[int], threshold: float | None = None
    ) -> list[Hit | None]:
        """Nearest length-compatible entry per query, if within ``threshold`` (predicted
        distance)."""
        return Lookup(self.db, self.threshold if threshold is None else threshold).find(
            feats, lengths
        )

    def fetch(self, entry: int, layer: int, length: int, device=None) -> torch.Tensor:
        """[H, L, L] maps of one layer: a zero-copy memmap view (float16) or the decoded codec
        form."""
        return self.store.layer(entry, layer, length).to(device=device)

    def info(self, top: int = 5) -> DbInfo:
        return describe(self.db, top)

    # -- attach -----------------------------------------------------------------------------------
    def attach(
        self,
        model: nn.Module,
        policy: str | Policy | None = None,
        threshold: float | None = None,
        learn: bool = False,
        prefetch: bool | None = None,
        device_map_bytes: int | None = None,
    ) -> Attachment:
        """Context manager: while inside, every forward of ``model`` looks up and replays this
        cache.

        ``learn``: inputs that miss are kept; ``Attachment.learn_pending()`` records and inserts
        them. ``prefetch``: decode hits' maps in a background thread (default: for compact codecs).
        ``device_map_bytes``: keep the hottest maps on the model's device, up to this many bytes."""
        self.check_model(model)
        threshold = self.threshold if threshold is None else threshold
        if prefetch is None:
            prefetch = self.store.layout.codec != "float16"
        learner = (lambda seqs: online.learn(self.db, model, self.adapter, seqs)) if learn else None
        resident = DeviceMapCache(device_map_bytes) if device_map_bytes else None
        return Attachment(
            model,
            self.parts(threshold),
            self.policy(policy),
            Lookup(self.db, threshold),
            StoreMaps(self.db, prefetch, resident),
            learner,
        )

    def parts(self, threshold: float | None = None, stats: MapStats | None = None) -> CacheParts:
        """What an ``Attachment`` needs of this cache (``stats``: counters other than the
        cache's own, for a measurement apart)."""
        return CacheParts(
            self.adapter,
            self.shape,
            self.store.layout.layers,
            self.templates,
            self.stats if stats is None else stats,
            self.threshold if threshold is None else threshold,
        )

    def check_model(self, model: nn.Module) -> None:
        want = self.manifest["model"]["fingerprint"]
        got = models.fingerprint(model)
        diff = [k for k in ("config", "weights") if want.get(k) != got.get(k)]
        if diff:
            raise UserError(
                f"this cache was built for another model ({' and '.join(diff)} differ): "
                f"built for '{self.manifest['model']['name']}'"
            )

    def check_tokenizer(self, tokenizer) -> None:
        want = self.manifest["model"]["fingerprint"].get("tokenizer")
        if want is not None and want != models.fingerprint_tokenizer(tokenizer):
            raise UserError("this cache was built with a different tokenizer")

    # -- growing and maintaining the DB
    # -------------------------------------------------------------
    def learn(
        self,
        model: nn.Module,
        seqs: Sequence[Sequence[int]],
        progress: bool = False,
        lock_wait_s: float = 10.0,
    ) -> int:
        """Record ``seqs`` on ``model`` (no cache attached) and insert them; how many were
        stored."""
        self.check_model(model)
        return online.learn(self.db, model, self.adapter, seqs, progress, lock_wait_s)

    def insert(
        self, maps: Sequence[np.ndarray], feats: np.ndarray, lock_wait_s: float = 10.0
    ) -> list[int]:
        """Add entries, evicting to stay within the cap; returns their uids."""
        return online.insert(self.db, maps, feats, lock_wait_s)

    def evict_to(self, max_bytes: int, lock_wait_s: float = 10.0) -> int:
        """Evict (and reclaim) until the map segments hold at most ``max_bytes``; entries
        evicted."""
        return self.db.commit_cap(max_bytes, lock_wait_s)

    def retrain(self, progress: bool = True, lock_wait_s: float = 10.0) -> dict:
        return online.retrain(self.db, progress, lock_wait_s)

    def update_settings(self, lock_wait_s: float = 10.0, **fields) -> None:
        self.db.commit_settings(lock_wait_s, **fields)

    def save_usage(self, lock_wait_s: float = 2.0) -> bool:
        return self.db.save_usage(lock_wait_s)
