"""What ``attncache inspect`` reports about a DB: sizes, codec, cap, settings and the most used
entries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .database import Database
from .files import folder_bytes


@dataclass(frozen=True)
class TopEntry:
    uid: int
    hits: int
    tokens: int


@dataclass(frozen=True)
class DbInfo:
    db: str
    format_version: int
    model: str
    model_type: str
    entries: int
    bytes_on_disk: int  # every file of the folder (manifest and small files included)
    map_bytes: int  # the map segments: what --max-bytes bounds
    bytes_per_entry: float
    compression: str
    map_bytes_vs_fp32: float
    max_bytes: int | None
    eviction: str
    evictions: int
    segments: int
    stored_layers: int
    length_min: int
    length_median: float
    length_max: int
    threshold: float
    policy_layers: list[int]
    policy_heads: int
    policy_fixed_heads: int
    template_heads: int
    allow_crop: bool
    index: str
    projector_pearson: float | None
    total_hits: int
    top_entries: list[TopEntry] = field(default_factory=list)
    calibrated: bool = False
    policy_source: str = ""
    default_reuse: str = ""  # in words: what the default policy reuses and on what evidence

    def as_dict(self) -> dict:
        return asdict(self)


def describe(db: Database, top: int = 5) -> DbInfo:
    table = db.store.table
    n = len(table)
    lengths = table.length
    fp32 = float(sum(db.store.layout.fp32_bytes(int(x)) for x in lengths))
    hits = table.hits + db.usage.pending_hits(table)
    order = np.argsort(-hits, kind="stable")[:top]
    policy = db.manifest["policy"]
    on_disk = folder_bytes(db.folder)
    return DbInfo(
        db=str(db.folder),
        format_version=int(db.manifest["format_version"]),
        model=db.model.name,
        model_type=db.model.model_type,
        entries=n,
        bytes_on_disk=on_disk,
        map_bytes=db.store.nbytes,
        bytes_per_entry=on_disk / n if n else 0.0,
        compression=db.store.layout.codec,
        map_bytes_vs_fp32=db.store.nbytes / fp32 if fp32 else 0.0,
        max_bytes=db.max_bytes,
        eviction=db.eviction,
        evictions=int(db.manifest.get("evictions", 0)),
        segments=len(db.manifest["segments"]),
        stored_layers=len(db.store.layout.layers),
        length_min=int(lengths.min()) if n else 0,
        length_median=float(np.median(lengths)) if n else 0.0,
        length_max=int(lengths.max()) if n else 0,
        threshold=db.threshold,
        policy_layers=list(policy["layers"]),
        policy_heads=sum(len(h) for h in policy.get("heads", {}).values()),
        policy_fixed_heads=sum(len(h) for h in policy.get("fixed", {}).values()),
        template_heads=len(db.manifest.get("templates", {}).get("heads", [])),
        allow_crop=db.allow_crop,
        index="hnsw" if db.index.approximate else "flat",
        projector_pearson=db.train_report.get("pearson"),
        total_hits=int(hits.sum()),
        top_entries=[
            TopEntry(int(table.uid[i]), int(hits[i]), int(table.length[i]))
            for i in order
            if hits[i] > 0
        ],
        calibrated="calibration" in db.manifest,
        policy_source=str(policy.get("source", "")),
        default_reuse=_default_reuse(db.manifest),
    )


def _default_reuse(manifest: dict) -> str:
    policy = manifest["policy"]
    parts = [
        (len(policy.get("layers", [])), "layers"),
        (sum(len(h) for h in policy.get("heads", {}).values()), "heads"),
        (sum(len(h) for h in policy.get("fixed", {}).values()), "template heads"),
    ]
    what = ", ".join(f"{n} {name}" for n, name in parts if n)
    if not what:
        return (
            "no approximate maps (" + str(policy.get("source", "no setting passed a bound")) + ")"
        )
    cal = manifest.get("calibration")
    if cal:
        return (
            f"{what}: reuse {cal['reuse_fraction']:.3f} of maps, changed answers <= "
            f"{cal['disagreement_bound']:.3f} ({cal['confidence']:.0%} bound on {cal['n']} rows)"
        )
    return f"{what}: not calibrated (no measured bound)"
