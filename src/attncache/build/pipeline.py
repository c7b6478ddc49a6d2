"""The offline build: record -> pair labels -> projector -> index -> defaults -> publish.

Every stage writes into a staging folder beside ``out`` (``db.staging``); the DB appears at ``out``
only when the whole build succeeded, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import nn

from .. import models
from ..db import (
    Database,
    EntryTable,
    LookupParts,
    MapStore,
    SegmentWriter,
    StoredMaps,
    StoreLayout,
    VectorIndex,
    scratch_folder,
    staging,
)
from ..db import eviction as eviction_policies
from ..db.codecs import get_codec
from ..db.manifest import FORMAT_VERSION, ModelInfo
from ..errors import UserError
from ..runtime.adapters import Adapter, get_adapter
from ..runtime.lookup import SEARCH_K, fits
from .projector_fit import ProjectorConfig, default_policy, fit_projector
from .record import RecordOptions, record

PROBE_INPUTS = (
    64  # inputs recorded with every layer to choose the stored layers (store_layers='auto')
)


@dataclass
class BuildConfig:
    # how maps are stored (codecs.py): 'auto' = float16, read zero-copy, so a hit is never slower
    # than its miss (measured: float16 hits 1.18x, int8 1.02x, decoding eats the gain); int8 keeps a
    # causal map in < 1/8 of its fp32 bytes when disk matters more than speed
    codec: str = "auto"
    sparse_eps: float | None = None  # sparse codec: mass a row may drop (default 0.02)
    layers: list[int] | None = None  # layers whose maps are stored (None: all)
    store_layers: str = "all"  # 'auto': store only the layers the default policy reuses (probed)
    batch_size: int = 8
    max_batch_elems: int = 8 * 256 * 256  # cap on batch * T^2 while recording (memory)
    default_policy_fraction: float = 1 / 6  # share of layers the conservative default reuses
    threshold_quantile: float = 0.5  # of each entry's distance to its nearest other entry
    max_bytes: int | None = None  # cap on the map segments' bytes; inputs past it are not stored
    eviction: str = "lru"
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass(frozen=True)
class BuildInputs:
    """What a build records: token sequences and, optionally, the data row each came from (one
    per sequence). With rows, the default threshold ignores neighbours from the same row (e.g. two
    choices of one prompt): a new input never has a sibling of its own row in the DB."""

    sequences: Sequence[Sequence[int]]
    groups: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.groups is not None and len(self.groups) != len(self.sequences):
            raise UserError(
                f"{len(self.groups)} groups for {len(self.sequences)} sequences: give one each"
            )

    def group_of(self) -> dict[tuple[int, ...], int]:
        """Each distinct sequence's row; the first occurrence wins, as in ``unique``."""
        given = self.groups
        rows: dict[tuple[int, ...], int] = {}
        for i, s in enumerate(self.sequences):
            rows.setdefault(tuple(map(int, s)), int(given[i]) if given is not None else i)
        return rows


@dataclass(frozen=True)
class BuildRunOptions:
    progress: bool = True  # bars on a terminal, one line per stage otherwise
    force: bool = False  # replace a DB already at ``out`` (atomically: ``db.staging``)


def unique(seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Non-empty sequences, first occurrence kept."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for s in seqs:
        key = tuple(int(x) for x in s)
        if key and key not in seen:
            seen.add(key)
            out.append(list(key))
    return out


def build(
    model: nn.Module,
    tokenizer,
    inputs: BuildInputs,
    out,
    cfg: BuildConfig | None = None,
    run: BuildRunOptions | None = None,
) -> None:
    """Record maps for ``inputs``, train the projector, index, and publish the DB at ``out``."""
    cfg, run = cfg or BuildConfig(), run or BuildRunOptions()
    progress = run.progress
    eviction_policies.check(cfg.eviction)
    if cfg.store_layers not in ("all", "auto"):
        raise UserError(f"store_layers must be 'all' or 'auto', got '{cfg.store_layers}'")
    adapter = get_adapter(model.config)
    shape = adapter.shape(model.config)
    group_of = inputs.group_of()
    seqs = unique(inputs.sequences)
    if len(seqs) < 2:
        raise UserError(
            f"need at least 2 distinct non-empty inputs to build a cache, got {len(seqs)}"
        )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(s) for s in seqs)
    if max_pos and longest > max_pos:
        raise UserError(f"an input has {longest} tokens; the model takes at most {max_pos}")
    if cfg.layers is not None:
        bad = [x for x in cfg.layers if not 0 <= x < shape.n_layers]
        if bad:
            raise UserError(
                f"layer {bad[0]} does not exist (the model has {shape.n_layers} layers)"
            )
    layers = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(shape.n_layers))
    codec = get_codec(
        cfg.codec if cfg.codec != "auto" else "float16",
        cfg.sparse_eps,
    )  # refuse a bad name before any work
    with staging(out, run.force) as folder:
        probe_source = None
        if cfg.store_layers == "auto":
            layers = _probe_layers(model, seqs, layers, cfg, folder, progress)
            probe_source = (
                f"build: only these {len(layers)} layers are stored: the most stable on a "
                f"probe of {min(len(seqs), PROBE_INPUTS)} inputs (store_layers=auto)"
            )
        layout = StoreLayout(
            shape.n_heads, layers, codec.name, getattr(codec, "eps", None), adapter.causal
        )
        writer = SegmentWriter(folder, layout, cfg.max_bytes)
        feats, entry_groups = [], []
        recording = RecordOptions(cfg.batch_size, cfg.max_batch_elems, progress)
        for got in record(model, adapter, layers, seqs, recording):
            if writer.add(got.maps):
                feats.append(got.feats)
                entry_groups.append(group_of[tuple(seqs[got.index])])
        table, segments = writer.finish()
        if len(table) < 2:
            raise UserError(
                f"--max-bytes {cfg.max_bytes} holds {len(table)} entries; at least 2 are needed"
            )
        feats_arr = np.stack(feats)
        store = MapStore(folder, layout, table, segments)
        fit = fit_projector(store, feats_arr, adapter.causal, cfg.projector, progress)
        vectors = fit.projector.project(feats_arr)
        index = VectorIndex.build(vectors, table.uid)
        manifest = _manifest(model, tokenizer, adapter, layout, cfg)
        manifest["projector"].update(train=fit.report, in_dim=int(feats_arr.shape[1]))
        manifest["policy"] = (
            default_policy(fit.layer_distance, layers, cfg.default_policy_fraction)
            if probe_source is None
            else {"layers": layers, "source": probe_source}
        )
        manifest["threshold"] = default_threshold(
            index, vectors, table, adapter.causal, entry_groups, cfg.threshold_quantile
        )
        if writer.dropped:
            manifest["build_dropped_by_cap"] = writer.dropped
        lookup = LookupParts(feats_arr, fit.projector, index, vectors)
        Database.create(folder, manifest, StoredMaps(table, segments, layout), lookup)
    if writer.dropped and progress:
        print(
            f"--max-bytes reached: {writer.dropped} of {len(seqs)} inputs were not stored",
            file=sys.stderr,
        )


def default_threshold(
    index: VectorIndex,
    vectors: np.ndarray,
    table: EntryTable,
    allow_crop: bool,
    groups: Sequence[int],
    quantile: float,
) -> float:
    """Quantile of each entry's predicted distance to its nearest compatible entry of another row (a
    new input never has a sibling from its own row, e.g. another choice of the same prompt).
    ``vectors`` and ``groups`` are in ``table``'s order."""
    lengths = table.length
    dist, found = index.search(vectors, SEARCH_K + 1)
    rows = np.searchsorted(table.uid, np.where(found < 0, 0, found))
    nearest = []
    for i in range(len(vectors)):
        for d, uid, row in zip(dist[i], found[i], rows[i], strict=True):
            if (
                uid >= 0
                and groups[row] != groups[i]
                and fits(int(lengths[row]), int(lengths[i]), allow_crop)
            ):
                nearest.append(float(d))
                break
    return float(np.quantile(nearest, quantile)) if nearest else 0.0


def _probe_layers(
    model, seqs, layers: list[int], cfg: BuildConfig, folder, progress: bool
) -> list[int]:
    """Record a sample with every layer (float16), measure layer stability, keep the default's
    layers."""
    adapter = get_adapter(model.config)
    sample = seqs[:PROBE_INPUTS]
    layout = StoreLayout(
        adapter.shape(model.config).n_heads, layers, "float16", None, adapter.causal
    )
    with scratch_folder(folder, "probe") as probe:
        writer = SegmentWriter(probe, layout)
        feats = []
        probing = RecordOptions(cfg.batch_size, cfg.max_batch_elems, progress, "probing layers")
        for got in record(model, adapter, layers, sample, probing):
            writer.add(got.maps)
            feats.append(got.feats)
        table, segments = writer.finish()
        store = MapStore(probe, layout, table, segments)
        pcfg = ProjectorConfig(**{**asdict(cfg.projector), "pairs": min(cfg.projector.pairs, 1000)})
        fit = fit_projector(store, np.stack(feats), adapter.causal, pcfg, progress)
        del store
    return default_policy(fit.layer_distance, layers, cfg.default_policy_fraction)["layers"]


def _manifest(model, tokenizer, adapter: Adapter, layout: StoreLayout, cfg: BuildConfig) -> dict:
    shape = adapter.shape(model.config)
    info = ModelInfo(
        models.name_of(model),
        model.config.model_type,
        adapter.name,
        adapter.causal,
        models.fingerprint(model, tokenizer),
        shape,
    )
    return {
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": info.to_json(),
        "store": {**asdict(layout), "max_bytes": cfg.max_bytes, "eviction": cfg.eviction},
        "threshold_quantile": cfg.threshold_quantile,
        "projector": {
            "in_dim": None,
            "hidden": cfg.projector.hidden,
            "out_dim": cfg.projector.out_dim,
            "alpha": cfg.projector.alpha,
            "features": "mean layer-0 normalised token embeddings + log(L)",
        },
        "allow_crop": adapter.causal,
    }
