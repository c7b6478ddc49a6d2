"""AttnCache: build / open / lookup / fetch / attach — ties record, store, projector and index together."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import models
from .adapters import Adapter, Shape, get_adapter
from .codecs import get_codec
from .errors import UserError
from .index import VectorIndex
from .inputs import collate, length_batches
from .policy import Policy, parse_policy
from .projector import Projector, ProjectorConfig, pair_labels, sample_pairs, train
from .record import Recorder
from .replay import Attached, Hit, Stats
from .store import (
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    READERS,
    SEGMENT_BYTES,
    EntryTable,
    MapStore,
    StoreLayout,
    atomic_write_json,
    check_files,
    describe_files,
    encode_entry,
    load_npy,
    opening,
    read_manifest,
    remove_unreferenced,
    safe_name,
    save_npy,
    seg_name,
    write_lock,
    write_segment,
)
from .templates import Templates

SEARCH_K = 64  # neighbours inspected per lookup to find the nearest length-compatible entry
PROBE_INPUTS = 64  # inputs recorded with every layer to choose the stored layers (store_layers='auto')
EVICTION = ("lru", "lfu")


@dataclass
class BuildConfig:
    # how maps are stored (codecs.py): 'auto' = int8 for decoders (a causal map in < 1/8 of its fp32 bytes,
    # accuracy within one row of float16 on SST-2 and PIQA), float16 for encoders (int8 full rows are 1/4)
    codec: str = "auto"
    sparse_eps: float | None = None  # sparse codec: mass a row may drop (default 0.02)
    layers: list[int] | None = None  # layers whose maps are stored (None: all)
    store_layers: str = "all"  # 'auto': store only the layers the default policy reuses (probed on a sample)
    batch_size: int = 8
    max_batch_elems: int = 8 * 256 * 256  # cap on batch * T^2 while recording (memory)
    default_policy_fraction: float = 1 / 6  # share of layers the conservative default reuses
    threshold_quantile: float = 0.5  # of each entry's distance to its nearest other entry
    max_bytes: int | None = None  # cap on the map segments' bytes; inputs past it are not stored
    eviction: str = "lru"
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


class AttnCache:
    def __init__(self, folder: Path, manifest: dict, store: MapStore, projector: Projector, index: VectorIndex,
                 vectors: np.ndarray):
        self.folder = Path(folder)
        self.manifest = manifest
        self.store = store
        self.projector = projector
        self.index = index
        self.vectors = vectors
        m = manifest["model"]
        self.adapter: Adapter = get_adapter(m["model_type"])
        self.shape = Shape(m["n_layers"], m["n_heads"], m["n_kv_heads"], m["head_dim"])
        self.allow_crop: bool = manifest["allow_crop"]
        self.stats = Stats()
        self._usage: dict[int, list[float]] = {}  # uid -> [hits, last use] not yet written to the manifest
        self._usage_lock = threading.Lock()
        self._templates: tuple[str, Templates] | None = None
        self._templates_override: Templates | None = None

    # -- properties stored in the manifest --------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def default_layers(self) -> list[int]:
        return list(self.manifest["policy"]["layers"])

    @property
    def max_bytes(self) -> int | None:
        return self.manifest["store"].get("max_bytes")

    @property
    def head_distance(self) -> np.ndarray | None:
        """[n_layers, H] build-time map distance per (layer, head) (stored layers; others +inf)."""
        hd = self.manifest["projector"].get("train", {}).get("head_distance")
        if hd is None:
            return None
        out = np.full((self.shape.n_layers, self.shape.n_heads), np.inf)
        out[self.store.layout.layers] = np.asarray(hd)
        return out

    def policy(self, spec: str | Policy | None = None) -> Policy:
        if isinstance(spec, Policy):
            return spec
        t = self.templates
        return parse_policy(spec, self.shape.n_layers, self.shape.n_heads, self.manifest["policy"], self.head_distance,
                            t.heads if t is not None else None)

    @property
    def templates(self) -> Templates | None:
        """The template maps of the heads calibration chose (``templates.py``), if any."""
        if self._templates_override is not None:
            return self._templates_override
        name = self.manifest.get("names", {}).get("templates")
        if name is None:
            return None
        if self._templates is None or self._templates[0] != name:
            maps = load_npy(self.folder / safe_name(name), mmap=True)
            heads = [tuple(x) for x in self.manifest["templates"]["heads"]]
            if maps.ndim != 3 or maps.shape[0] != len(heads):
                raise UserError(f"{self.folder}: template maps have shape {maps.shape} for {len(heads)} heads; "
                                f"run 'attncache verify' or calibrate again")
            self._templates = (name, Templates(heads, maps, self.adapter.causal))
        return self._templates[1]

    def use_templates(self, t: Templates | None) -> None:
        """Use ``t`` in this process (not stored; calibration tries templates before keeping any)."""
        self._templates_override = t

    def set_templates(self, t: Templates | None, info: dict | None = None, lock_wait_s: float = 10.0) -> None:
        """Store (or, with None, drop) template maps, in one commit under the write lock."""
        with write_lock(self.folder, lock_wait_s):
            self._sync()
            self._flush_usage_into_manifest()
            m = dict(self.manifest)
            gen = int(m.get("generation", 0)) + 1
            names = dict(_generation_files(m))
            names.pop("templates", None)
            m.pop("templates", None)
            if t is not None:
                names["templates"] = f"templates-{gen}.npy"
                save_npy(self.folder / names["templates"], np.ascontiguousarray(t.maps, dtype=np.float16))
                m["templates"] = {**(info or {}), "heads": [list(x) for x in t.heads], "max_len": t.max_len}
            # the stored policy may only name heads that still have templates
            have = set(t.heads) if t is not None else set()
            fixed = {k: [h for h in hs if (int(k), h) in have] for k, hs in m["policy"].get("fixed", {}).items()}
            if "fixed" in m["policy"]:
                m["policy"] = {**m["policy"], "fixed": {k: v for k, v in fixed.items() if v}}
            m.update(generation=gen, names=names, files=describe_files(self.folder, list(names.values())))
            atomic_write_json(self.folder / MANIFEST, m)
            self.manifest = m
            remove_unreferenced(self.folder, m)

    # -- build ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, tokenizer, sequences: Sequence[Sequence[int]], out: str | Path,
              cfg: BuildConfig | None = None, progress: bool = True, force: bool = False,
              groups: Sequence[int] | None = None) -> AttnCache:
        """Record maps for ``sequences`` (token id lists), train the projector, index, write DB ``out``.

        ``groups`` (optional, one per sequence) names the data row each sequence came from; the default
        threshold then ignores neighbours from the same row (e.g. two choices of one prompt), which a new
        input would never have.
        """
        cfg = cfg or BuildConfig()
        out = Path(out)
        if out.exists() and (out.is_file() or any(out.iterdir())) and not force:
            raise UserError(f"'{out}' already exists; choose a new --out or pass --force to replace it")
        if cfg.eviction not in EVICTION:
            raise UserError(f"eviction must be one of {', '.join(EVICTION)}, got '{cfg.eviction}'")
        if cfg.store_layers not in ("all", "auto"):
            raise UserError(f"store_layers must be 'all' or 'auto', got '{cfg.store_layers}'")
        adapter = get_adapter(model.config)
        shape = adapter.shape(model.config)
        group_of: dict[tuple[int, ...], int] = {}
        for i, s in enumerate(sequences):  # first occurrence wins, as in _unique
            group_of.setdefault(tuple(map(int, s)), int(groups[i]) if groups is not None else i)
        seqs = _unique([list(map(int, s)) for s in sequences if len(s) > 0])
        if len(seqs) < 2:
            raise UserError(f"need at least 2 distinct non-empty inputs to build a cache, got {len(seqs)}")
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos and max(len(s) for s in seqs) > max_pos:
            raise UserError(f"an input has {max(len(s) for s in seqs)} tokens; the model takes at most {max_pos}")
        if cfg.layers is not None:
            bad = [x for x in cfg.layers if not 0 <= x < shape.n_layers]
            if bad:
                raise UserError(f"layer {bad[0]} does not exist (the model has {shape.n_layers} layers)")
        layers = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(shape.n_layers))
        name = cfg.codec if cfg.codec != "auto" else ("int8" if adapter.causal else "float16")
        codec = get_codec(name, cfg.sparse_eps)  # refuse a bad name before any work
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.building-*"):  # an interrupted build: start clean
            if not _locked(stale):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
        try:
            with write_lock(tmp):
                probe_source = None
                if cfg.store_layers == "auto":
                    layers, probe_source = _probe_layers(model, adapter, seqs, layers, cfg, tmp, progress)
                layout = StoreLayout(shape.n_heads, layers, codec.name, getattr(codec, "eps", None), adapter.causal)
                table, segments, feats, entry_groups, dropped = _record_into(
                    tmp, model, adapter, layout, seqs, cfg, progress, [group_of[tuple(s)] for s in seqs])
                if len(table) < 2:
                    raise UserError(f"--max-bytes {cfg.max_bytes} holds {len(table)} entries; at least 2 are needed")
                store = MapStore(tmp, layout, table, segments)
                manifest = _manifest(model, tokenizer, adapter, shape, layout, cfg)
                manifest.update(entries=table.to_json(), segments=segments, generation=0, next_seg=len(segments),
                                next_uid=len(table))
                proj, report, layer_tv = _fit_projector(store, feats, adapter.causal, cfg.projector, progress)
                manifest["projector"]["train"] = report
                manifest["projector"]["in_dim"] = int(feats.shape[1])
                vectors = proj.project(feats)
                index = VectorIndex.build(vectors)
                cache = cls(tmp, manifest, store, proj, index, vectors)
                manifest["threshold"] = cache._default_threshold(vectors, cfg.threshold_quantile, entry_groups)
                manifest["policy"] = _default_policy(layer_tv, layers, cfg.default_policy_fraction)
                if probe_source:
                    manifest["policy"] = {"layers": layers, "source": probe_source}
                if dropped:
                    manifest["build_dropped_by_cap"] = dropped
                cache._write_generation(manifest, feats, vectors, proj, index)
                _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if dropped and progress:
            print(f"--max-bytes reached: {dropped} of {len(seqs)} inputs were not stored", file=sys.stderr)
        return cls.open(out)

    # -- open -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, max_bytes: int | None = None, eviction: str | None = None) -> AttnCache:
        """Open a DB for reading (no lock). ``max_bytes``/``eviction`` override the stored cap for inserts."""
        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"cache DB '{folder}' does not exist")
        for attempt in range(5):
            try:
                with opening(folder):
                    cache = cls._open_once(folder)
                break
            except FileNotFoundError:  # a writer committed and removed an old generation meanwhile
                if attempt == 4:
                    raise UserError(f"{folder}: files keep disappearing while opening; is a writer replacing it?") from None
                time.sleep(0.05)
        if eviction is not None:
            if eviction not in EVICTION:
                raise UserError(f"eviction must be one of {', '.join(EVICTION)}, got '{eviction}'")
            cache.manifest["store"]["eviction"] = eviction
        if max_bytes is not None:
            if max_bytes <= 0:
                raise UserError(f"--max-bytes must be positive, got {max_bytes}")
            cache.manifest["store"]["max_bytes"] = int(max_bytes)
        return cache

    @classmethod
    def _open_once(cls, folder: Path) -> AttnCache:
        m = read_manifest(folder)
        problems = check_files(folder, m)  # cheap: presence and sizes
        if problems:
            raise UserError(f"{folder}: damaged cache: {problems[0]}; run 'attncache verify {folder}' or rebuild")
        try:
            s = m["store"]
            layout = StoreLayout(s["n_heads"], s["layers"], s["codec"], s.get("eps"), s["causal"])
            table = EntryTable.from_json(m["entries"])
            p = m["projector"]
            names = _generation_files(m)
        except (KeyError, TypeError) as e:
            raise UserError(f"{folder}: malformed manifest (missing {e})") from None
        store = MapStore(folder, layout, table, m["segments"])
        try:
            proj = Projector.load(folder / names["projector"], p["in_dim"], p["hidden"], p["out_dim"])
            vectors = load_npy(folder / names["vectors"])
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{folder}: damaged cache ({e}); run 'attncache verify' or rebuild") from None
        if vectors.shape != (len(store), p["out_dim"]):
            raise UserError(f"{folder}: vectors have shape {vectors.shape}, expected {(len(store), p['out_dim'])}")
        ix = m.get("index", {})
        if ix.get("approximate") and "index" in names:
            index = VectorIndex.load(folder / names["index"], p["out_dim"], ix.get("ef_search", 128))
        else:
            index = VectorIndex.build(vectors, approximate=False)
        return cls(folder, m, store, proj, index, vectors)

    @staticmethod
    def verify(folder: str | Path) -> list[str]:
        """Full integrity check: every file present, of the recorded size and checksum, every entry's crc32
        matching; no foreign files."""
        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"cache DB '{folder}' does not exist")
        m = read_manifest(folder)
        return check_files(folder, m, full=True)

    def compress(self, out: str | Path, codec: str, sparse_eps: float | None = None, progress: bool = True,
                 force: bool = False) -> AttnCache:
        """A copy of this DB with every map re-encoded by ``codec``; projector, vectors, threshold and policy
        are kept, so lookups hit exactly the same entries and only the maps' precision differs."""
        out = Path(out)
        if out.exists() and not force:
            raise UserError(f"'{out}' already exists; choose a new --out or pass --force to replace it")
        coder = get_codec(codec, sparse_eps)
        old = self.store.layout
        layout = StoreLayout(old.n_heads, old.layers, coder.name, getattr(coder, "eps", None), old.causal)
        tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=f".{out.name}.building-"))
        try:
            t = self.store.table
            blobs, segments, table = [], {}, EntryTable.empty()
            for e in tqdm(range(len(t)), desc=f"re-encoding ({codec})", disable=not progress, leave=False):
                L = int(t.length[e])
                maps = np.stack([self.store.layer(e, layer, L).float().numpy() for layer in old.layers])
                blobs.append(encode_entry(layout, maps))
            offsets, crcs = write_segment(tmp, 0, blobs)
            segments[seg_name(0)] = sum(len(b) for b in blobs)
            table = EntryTable(t.uid.copy(), np.zeros(len(t), np.int64), np.asarray(offsets, np.int64),
                               np.asarray([len(b) for b in blobs], np.int64), t.length.copy(),
                               np.asarray(crcs, np.int64), t.hits.copy(), t.last_used.copy())
            m = json.loads(json.dumps(self.manifest))
            m["store"].update(codec=layout.codec, eps=layout.eps)
            m.update(entries=table.to_json(), segments=segments, next_seg=1, generation=0)
            m.pop("files", None)
            cache = AttnCache(tmp, m, MapStore(tmp, layout, table, segments), self.projector, self.index, self.vectors)
            cache._write_generation(m, self._features(), self.vectors, self.projector, self.index)
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return AttnCache.open(out)

    @staticmethod
    def migrate(folder: str | Path) -> bool:
        """Convert a format-1 DB in place (its maps.bin becomes one float16 segment). False if already current."""
        return _migrate_v1(Path(folder))

    # -- lookup and fetch -------------------------------------------------------------------------
    def compatible(self, entry: int, length: int) -> bool:
        Le = int(self.store.lengths[entry])
        return Le == length or (self.allow_crop and Le > length)

    def lookup(self, feats: np.ndarray, lengths: Sequence[int], threshold: float | None = None) -> list[Hit | None]:
        """Nearest length-compatible entry per query, if within ``threshold`` (predicted distance)."""
        thr = self.threshold if threshold is None else threshold
        if len(self.store) == 0:
            return [None] * len(lengths)
        dist, ids = self.index.search(self.projector.project(feats), SEARCH_K)
        hits: list[Hit | None] = []
        for b, L in enumerate(lengths):
            hit = None
            for d, e in zip(dist[b], ids[b]):
                if e < 0 or L <= 0:
                    break
                if self.compatible(int(e), L):
                    if d <= thr:
                        hit = Hit(int(e), int(L), float(d))
                    break
            hits.append(hit)
        now = time.time()
        with self._usage_lock:
            for h in hits:
                if h is not None:
                    u = self._usage.setdefault(int(self.store.table.uid[h.entry]), [0, 0.0])
                    u[0] += 1
                    u[1] = now
        return hits

    def fetch(self, entry: int, layer: int, length: int, device=None) -> torch.Tensor:
        """[H, L, L] maps of one layer: a zero-copy memmap view (float16 store) or the decoded codec form."""
        return self.store.layer(entry, layer, length).to(device=device)

    # -- attach -----------------------------------------------------------------------------------
    def attach(self, model: nn.Module, policy: str | Policy | None = None, threshold: float | None = None,
               learn: bool = False, **bench_hooks) -> Attached:
        """Context manager: while inside, every forward of ``model`` looks up and replays this cache.

        ``learn``: inputs that miss are recorded and inserted after each batch (``Attached.learn_pending``).
        """
        thr = self.threshold if threshold is None else threshold
        return Attached(self, model, self.policy(policy), thr, learn=learn, **bench_hooks)

    def check_model(self, model: nn.Module) -> None:
        want = self.manifest["model"]["fingerprint"]
        fp = getattr(model, "_attncache_fingerprint", None)
        if fp is None:
            fp = models.fingerprint(model)
            model._attncache_fingerprint = fp
        diff = [k for k in ("config", "weights") if want.get(k) != fp.get(k)]
        if diff:
            raise UserError(f"this cache was built for another model ({' and '.join(diff)} differ): "
                            f"built for '{self.manifest['model']['name']}'")

    def check_tokenizer(self, tokenizer) -> None:
        want = self.manifest["model"]["fingerprint"].get("tokenizer")
        got = models.fingerprint_tokenizer(tokenizer)
        if want is not None and want != got:
            raise UserError("this cache was built with a different tokenizer")

    # -- online insertion, eviction, retraining ---------------------------------------------------
    def learn(self, model: nn.Module, seqs: Sequence[Sequence[int]], progress: bool = False,
              lock_wait_s: float = 10.0) -> int:
        """Record ``seqs`` on ``model`` (no cache attached) and insert them. Returns how many were stored."""
        seqs = _unique([list(map(int, s)) for s in seqs if len(s) > 0])
        if not seqs:
            return 0
        self.check_model(model)
        layout = self.store.layout
        cfg = BuildConfig(batch_size=8)
        maps, feats = [], []
        for _i, m, f in _record(model, self.adapter, layout.layers, seqs, cfg, progress, "learning"):
            maps.append(m)
            feats.append(f)
        return len(self.insert(maps, np.stack(feats), lock_wait_s=lock_wait_s))

    def insert(self, maps: Sequence[np.ndarray], feats: np.ndarray, lock_wait_s: float = 10.0) -> list[int]:
        """Add entries (maps ``[n_stored_layers, H, L, L]`` and projector inputs), evicting to stay within the
        cap. Visible to this object's next lookup at once, to other processes when they reopen. Returns uids."""
        layout = self.store.layout
        blobs = [encode_entry(layout, np.asarray(m, dtype=np.float32)) for m in maps]
        lengths = [int(np.shape(m)[-1]) for m in maps]
        with write_lock(self.folder, lock_wait_s):
            self._sync()
            return self._apply(blobs, lengths, np.asarray(feats, dtype=np.float32))

    def evict_to(self, max_bytes: int, lock_wait_s: float = 10.0) -> int:
        """Evict (and reclaim) until the map segments hold at most ``max_bytes``; returns entries evicted."""
        with write_lock(self.folder, lock_wait_s):
            self._sync()
            self.manifest["store"]["max_bytes"] = int(max_bytes)
            before = len(self.store)
            self._apply([], [], np.zeros((0, self.projector.in_dim), np.float32))
            return before - len(self.store)

    def retrain(self, progress: bool = True, lock_wait_s: float = 10.0) -> dict:
        """Fit the projector again on every stored entry, re-project and re-index (after online growth)."""
        with write_lock(self.folder, lock_wait_s):
            self._sync()
            self._flush_usage_into_manifest()
            feats = self._features()
            pcfg = ProjectorConfig(**self.manifest["projector"]["train"].get("config", {}))
            proj, report, _ = _fit_projector(self.store, feats, self.adapter.causal, pcfg, progress)
            vectors = proj.project(feats)
            m = dict(self.manifest)
            m["projector"] = {**m["projector"], "train": report}
            old_thr = self.threshold
            self.projector, self.vectors = proj, vectors
            self.index = VectorIndex.build(vectors)
            uids = self.store.table.uid.tolist()
            m["threshold"] = self._default_threshold(vectors, self.manifest.get("threshold_quantile", 0.5), uids)
            self._write_generation(m, feats, vectors, proj, self.index)
            return {"entries": len(self.store), "pearson": report.get("pearson"), "threshold_before": old_thr,
                    "threshold": self.threshold}

    def update_settings(self, lock_wait_s: float = 10.0, **fields) -> None:
        """Set manifest fields (threshold, policy, calibration) in one commit, under the write lock."""
        with write_lock(self.folder, lock_wait_s):
            self._sync()
            self._flush_usage_into_manifest()
            self.manifest.update(fields)
            atomic_write_json(self.folder / MANIFEST, self.manifest)

    def save_usage(self, lock_wait_s: float = 2.0) -> bool:
        """Write this process's hit counts into the manifest (for LFU/LRU eviction and ``inspect``).
        Returns False if the lock could not be had in time (counts are kept for the next try)."""
        if not self._usage:
            return True
        try:
            with write_lock(self.folder, lock_wait_s):
                self._sync()
                self._flush_usage_into_manifest()
                atomic_write_json(self.folder / MANIFEST, self.manifest)
            return True
        except UserError:
            return False

    def _features(self) -> np.ndarray:
        return load_npy(self.folder / _generation_files(self.manifest)["features"])

    def _flush_usage_into_manifest(self) -> None:
        t = self.store.table
        with self._usage_lock:
            usage, self._usage = self._usage, {}
        pos = {int(u): i for i, u in enumerate(t.uid)}
        for uid, (h, last) in usage.items():
            i = pos.get(uid)
            if i is not None:
                t.hits[i] += int(h)
                t.last_used[i] = max(t.last_used[i], last)
        self.manifest["entries"] = t.to_json()

    def _sync(self) -> None:
        """Under the lock: reload if another writer committed since this object was opened."""
        on_disk = read_manifest(self.folder)
        if on_disk.get("generation") != self.manifest.get("generation") or on_disk.get("entries") != self.manifest.get("entries"):
            fresh = AttnCache._open_once(self.folder)
            keep = {k: self.manifest["store"][k] for k in ("max_bytes", "eviction") if k in self.manifest["store"]}
            self.manifest, self.store, self.projector = fresh.manifest, fresh.store, fresh.projector
            self.index, self.vectors = fresh.index, fresh.vectors
            self.manifest["store"].update(keep)

    def _apply(self, blobs: list[bytes], lengths: list[int], feats: np.ndarray) -> list[int]:
        """Evict, compact and append in one commit (caller holds the lock)."""
        self._flush_usage_into_manifest()
        t = self.store.table
        cap = self.max_bytes
        new_sizes = [len(b) for b in blobs]
        keep_new = list(range(len(blobs)))
        evicted = np.zeros(len(t), dtype=bool)
        if cap is not None:
            # a batch that cannot fit even alone keeps its first entries that do
            fit, tot = [], 0
            for j in keep_new:
                if tot + new_sizes[j] <= cap:
                    fit.append(j)
                    tot += new_sizes[j]
            keep_new = fit
            need = int(t.nbytes.sum()) + tot - cap
            if need > 0:
                for i in self._eviction_order():
                    if need <= 0:
                        break
                    evicted[i] = True
                    need -= int(t.nbytes[i])
        if not keep_new and not evicted.any():
            return []
        # segments holding an evicted entry are rewritten (their live entries move to the new segment)
        dirty = set(t.seg[evicted].tolist())
        move = [i for i in range(len(t)) if not evicted[i] and int(t.seg[i]) in dirty]
        seg = int(self.manifest["next_seg"])
        out_blobs = [bytes(self.store.raw(i)) for i in move] + [blobs[j] for j in keep_new]
        segments = {n: sz for n, sz in self.manifest["segments"].items() if int(n[4:10]) not in dirty}
        kept = np.flatnonzero(~evicted)
        table = t.take(kept)
        if out_blobs:
            offsets, crcs = write_segment(self.folder, seg, out_blobs)
            segments[seg_name(seg)] = sum(len(b) for b in out_blobs)
            row_of = {int(i): r for r, i in enumerate(kept)}
            for k, i in enumerate(move):
                r = row_of[i]
                table.seg[r], table.offset[r] = seg, offsets[k]
            n_moved = len(move)
            uid0 = int(self.manifest["next_uid"])
            now = time.time()
            added = EntryTable(
                uid=np.arange(uid0, uid0 + len(keep_new), dtype=np.int64),
                seg=np.full(len(keep_new), seg, np.int64),
                offset=np.asarray(offsets[n_moved:], np.int64),
                nbytes=np.asarray([new_sizes[j] for j in keep_new], np.int64),
                length=np.asarray([lengths[j] for j in keep_new], np.int64),
                crc=np.asarray(crcs[n_moved:], np.int64),
                hits=np.zeros(len(keep_new), np.int64),
                last_used=np.full(len(keep_new), now),
            )
            table = table.concat(added)
        new_feats = feats[keep_new]
        all_feats = np.concatenate([self._features()[kept], new_feats]) if len(new_feats) or evicted.any() else self._features()
        new_vec = self.projector.project(new_feats) if len(new_feats) else np.zeros((0, self.vectors.shape[1]), np.float32)
        vectors = np.concatenate([self.vectors[kept], new_vec]).astype(np.float32)
        if evicted.any():
            index = VectorIndex.build(vectors, approximate=self.index.approximate or None)
        else:
            index = self.index
            index.add(new_vec)
        m = dict(self.manifest)
        m.update(entries=table.to_json(), segments=segments, next_seg=seg + (1 if out_blobs else 0),
                 next_uid=int(self.manifest["next_uid"]) + len(keep_new))
        m["evictions"] = int(m.get("evictions", 0)) + int(evicted.sum())
        self.store = MapStore(self.folder, self.store.layout, table, segments)
        self.vectors, self.index = vectors, index
        self._write_generation(m, all_feats, vectors, None, index)
        return table.uid[len(table) - len(keep_new):].tolist()

    def _eviction_order(self) -> list[int]:
        t = self.store.table
        if self.manifest["store"].get("eviction", "lru") == "lfu":
            return np.lexsort((t.last_used, t.hits)).tolist()  # fewest hits first, then least recent
        return np.argsort(t.last_used, kind="stable").tolist()

    def _write_generation(self, m: dict, feats: np.ndarray, vectors: np.ndarray, proj: Projector | None,
                          index: VectorIndex) -> None:
        """Write this generation's small files under new names, commit the manifest, drop the old files."""
        gen = int(m.get("generation", -1)) + 1 if "files" in m else int(m.get("generation", 0))
        names = {"features": f"features-{gen}.npy", "vectors": f"vectors-{gen}.npy"}
        save_npy(self.folder / names["features"], feats)
        save_npy(self.folder / names["vectors"], vectors)
        if proj is not None:
            names["projector"] = f"projector-{gen}.safetensors"
            proj.save(self.folder / names["projector"])
        else:
            names["projector"] = _generation_files(m)["projector"]
        if "templates" in m.get("names", {}):  # not rewritten: they do not depend on the entries
            names["templates"] = _generation_files(m)["templates"]
        m["index"] = {"approximate": index.approximate, "ef_search": index.ef_search}
        if index.approximate:
            names["index"] = f"index-{gen}.faiss"
            index.save(self.folder / names["index"])
        m["generation"] = gen
        m["names"] = names
        m["files"] = describe_files(self.folder, list(names.values()))
        atomic_write_json(self.folder / MANIFEST, m)  # the commit point
        self.manifest = m
        remove_unreferenced(self.folder, m)

    # -- reporting --------------------------------------------------------------------------------
    def info(self, top: int = 5) -> dict:
        t = self.store.table
        on_disk = sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())
        n = len(self.store)
        lengths = t.length
        L = lengths.astype(np.float64)
        fp32 = float((len(self.store.layout.layers) * self.store.layout.n_heads * L * L * 4).sum())
        hits = t.hits.copy()
        pos = {int(u): i for i, u in enumerate(t.uid)}
        with self._usage_lock:
            for uid, (h, _) in self._usage.items():
                if uid in pos:
                    hits[pos[uid]] += int(h)
        order = np.argsort(-hits, kind="stable")[:top]
        return {
            "db": str(self.folder),
            "format_version": self.manifest["format_version"],
            "model": self.manifest["model"]["name"],
            "model_type": self.manifest["model"]["model_type"],
            "entries": n,
            "bytes_on_disk": on_disk,
            "map_bytes": self.store.nbytes,
            "bytes_per_entry": on_disk / n if n else 0.0,
            "compression": self.store.layout.codec,
            "map_bytes_vs_fp32": self.store.nbytes / fp32 if fp32 else 0.0,
            "max_bytes": self.max_bytes,
            "eviction": self.manifest["store"].get("eviction", "lru"),
            "evictions": int(self.manifest.get("evictions", 0)),
            "segments": len(self.manifest["segments"]),
            "stored_layers": len(self.store.layout.layers),
            "length_min": int(lengths.min()) if n else 0,
            "length_median": float(np.median(lengths)) if n else 0.0,
            "length_max": int(lengths.max()) if n else 0,
            "threshold": self.threshold,
            "policy_layers": self.default_layers,
            "policy_heads": sum(len(h) for h in self.manifest["policy"].get("heads", {}).values()),
            "policy_fixed_heads": sum(len(h) for h in self.manifest["policy"].get("fixed", {}).values()),
            "template_heads": len(self.manifest.get("templates", {}).get("heads", [])),
            "allow_crop": self.allow_crop,
            "index": "hnsw" if self.index.approximate else "flat",
            "projector_pearson": self.manifest["projector"].get("train", {}).get("pearson"),
            "total_hits": int(hits.sum()),
            "top_entries": [{"uid": int(t.uid[i]), "hits": int(hits[i]), "tokens": int(t.length[i])}
                            for i in order if hits[i] > 0],
        }

    # -- helpers ----------------------------------------------------------------------------------
    def _default_threshold(self, vectors: np.ndarray, q: float, groups: list[int]) -> float:
        """Quantile ``q`` of each entry's predicted distance to its nearest compatible entry of another row."""
        dist, ids = self.index.search(vectors, SEARCH_K + 1)
        nearest = []
        for i in range(len(vectors)):
            L = int(self.store.lengths[i])
            for d, e in zip(dist[i], ids[i]):
                if e >= 0 and groups[e] != groups[i] and self.compatible(int(e), L):
                    nearest.append(float(d))
                    break
        return float(np.quantile(nearest, q)) if nearest else 0.0


def _unique(seqs: list[list[int]]) -> list[list[int]]:
    seen, out = set(), []
    for s in seqs:
        k = tuple(s)
        if k not in seen:
            seen.add(k)
            out.append(s)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished DB folder into place, replacing ``out`` (taking its write lock first)."""
    if out.exists():
        with write_lock(out) if out.is_dir() else contextlib.nullcontext():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    for f in (LOCK, READERS):
        (tmp / f).unlink(missing_ok=True)
    os.replace(tmp, out)


def _locked(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s write lock (an interrupted build's folder is not locked)."""
    try:
        with write_lock(folder):
            return False
    except (UserError, OSError):
        return True


def _generation_files(m: dict) -> dict[str, str]:
    names = m.get("names")
    if not isinstance(names, dict) or not {"features", "vectors", "projector"} <= set(names):
        raise UserError("malformed manifest: no file names for this generation")
    return {k: safe_name(v) for k, v in names.items()}


def _record(model: nn.Module, adapter: Adapter, layers: list[int], seqs: list[list[int]], cfg: BuildConfig,
            progress: bool, desc: str = "recording maps") -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(index into seqs, maps [n_layers, H, L, L] float32, features) per sequence, batched by length."""
    pad = 0  # padded positions are masked and cut from the maps, so the pad id does not matter
    device = next(model.parameters()).device
    bar = tqdm(total=len(seqs), desc=desc, disable=not progress, leave=False)
    with torch.no_grad(), Recorder(model, adapter, layers) as rec:
        for batch in length_batches([len(s) for s in seqs], cfg.batch_size, cfg.max_batch_elems):
            inputs = {k: v.to(device) for k, v in collate([seqs[i] for i in batch], pad, adapter.causal).items()}
            model(**inputs, **({"logits_to_keep": 1} if adapter.causal else {}))
            maps, f = rec.take()
            for j, i in enumerate(batch):
                yield i, maps[j], f[j]
            bar.update(len(batch))
    bar.close()


def _record_into(folder: Path, model, adapter, layout: StoreLayout, seqs, cfg: BuildConfig, progress: bool,
                 groups: list[int]):
    """Record every sequence into segments of ``folder``; stop storing once ``cfg.max_bytes`` is reached."""
    blobs: list[bytes] = []
    rows: list[tuple[int, int]] = []  # (length, sequence index) per pending blob
    table = EntryTable.empty()
    segments: dict[str, int] = {}
    feats, entry_groups, total, dropped = [], [], 0, 0

    def flush():
        nonlocal blobs, rows, table
        if not blobs:
            return
        seg = len(segments)
        offsets, crcs = write_segment(folder, seg, blobs)
        segments[seg_name(seg)] = sum(len(b) for b in blobs)
        n, u0 = len(blobs), len(table)
        table = table.concat(EntryTable(
            uid=np.arange(u0, u0 + n), seg=np.full(n, seg), offset=np.asarray(offsets, np.int64),
            nbytes=np.asarray([len(b) for b in blobs], np.int64), length=np.asarray([r[0] for r in rows], np.int64),
            crc=np.asarray(crcs, np.int64), hits=np.zeros(n, np.int64), last_used=np.zeros(n)))
        blobs, rows = [], []

    pending = 0
    for i, maps, f in _record(model, adapter, layout.layers, seqs, cfg, progress):
        blob = encode_entry(layout, maps)
        if cfg.max_bytes is not None and total + len(blob) > cfg.max_bytes:
            dropped += 1
            continue
        blobs.append(blob)
        rows.append((maps.shape[-1], i))
        feats.append(f)
        entry_groups.append(groups[i])
        total += len(blob)
        pending += len(blob)
        if pending >= SEGMENT_BYTES:
            flush()
            pending = 0
    flush()
    feats_arr = np.stack(feats) if feats else np.zeros((0, 1), np.float32)
    return table, segments, feats_arr, entry_groups, dropped


def _probe_layers(model, adapter, seqs, layers, cfg: BuildConfig, tmp: Path, progress: bool):
    """Record a sample with every layer, measure layer stability, keep the default policy's layers."""
    probe = tmp / "probe"
    probe.mkdir()
    sample = seqs[:PROBE_INPUTS]
    layout = StoreLayout(model.config.num_attention_heads, layers, "float16", None, adapter.causal)
    table, segments, feats, _, _ = _record_into(probe, model, adapter, layout, sample,
                                                BuildConfig(batch_size=cfg.batch_size), progress, list(range(len(sample))))
    store = MapStore(probe, layout, table, segments)
    pcfg = ProjectorConfig(**{**asdict(cfg.projector), "pairs": min(cfg.projector.pairs, 1000)})
    _, _, layer_tv = _fit_projector(store, feats, adapter.causal, pcfg, progress)
    chosen = _default_policy(layer_tv, layers, cfg.default_policy_fraction)["layers"]
    del store
    shutil.rmtree(probe)
    return chosen, (f"build: only these {len(chosen)} layers are stored: the most stable on a probe of "
                    f"{len(sample)} inputs (store_layers=auto)")


def _manifest(model, tokenizer, adapter: Adapter, shape: Shape, layout: StoreLayout, cfg: BuildConfig) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {
            "name": getattr(model, "attncache_name", model.config._name_or_path),
            "model_type": model.config.model_type,
            "adapter": adapter.name,
            "causal": adapter.causal,
            "fingerprint": models.fingerprint(model, tokenizer),
            **asdict(shape),
        },
        "store": {**asdict(layout), "max_bytes": cfg.max_bytes, "eviction": cfg.eviction},
        "threshold_quantile": cfg.threshold_quantile,
        "projector": {"in_dim": None, "hidden": cfg.projector.hidden, "out_dim": cfg.projector.out_dim,
                      "alpha": cfg.projector.alpha, "features": "mean layer-0 normalised token embeddings + log(L)"},
        "allow_crop": adapter.causal,
    }


def _migrate_v1(folder: Path) -> bool:
    """Format 1 -> 2: maps.bin (dense float16, no headers) is re-encoded into one segment with layer headers."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"'{folder}' is not a cache DB (no {MANIFEST})")
    m = json.loads(path.read_text())
    if m.get("format_version") == FORMAT_VERSION:
        return False
    if m.get("format_version") != 1:
        raise UserError(f"{folder}: cannot migrate format {m.get('format_version')}; rebuild it")
    with write_lock(folder):
        s = m["store"]
        layout = StoreLayout(s["n_heads"], s["layers"], "float16", None, bool(m["model"]["causal"]))
        dt = np.dtype(s.get("dtype", "float16"))
        raw = np.memmap(folder / "maps.bin", dtype=np.uint8, mode="r")
        nl, H = len(layout.layers), layout.n_heads
        blobs = []
        for L, off in zip(m["entries"]["lengths"], m["entries"]["offsets"]):
            n = nl * H * L * L * dt.itemsize
            maps = raw[off: off + n].view(dt).reshape(nl, H, L, L)
            blobs.append(encode_entry(layout, maps))
        offsets, crcs = write_segment(folder, 0, blobs)
        N = len(blobs)
        table = EntryTable(np.arange(N), np.zeros(N, np.int64), np.asarray(offsets, np.int64),
                           np.asarray([len(b) for b in blobs], np.int64), np.asarray(m["entries"]["lengths"], np.int64),
                           np.asarray(crcs, np.int64), np.zeros(N, np.int64), np.zeros(N))
        gen = 1
        names = {"features": f"features-{gen}.npy", "vectors": f"vectors-{gen}.npy",
                 "projector": f"projector-{gen}.safetensors"}
        save_npy(folder / names["features"], load_npy(folder / "features.npy"))
        save_npy(folder / names["vectors"], load_npy(folder / "vectors.npy"))
        shutil.copyfile(folder / "projector.safetensors", folder / names["projector"])
        if (folder / "index.faiss").exists():
            names["index"] = f"index-{gen}.faiss"
            shutil.copyfile(folder / "index.faiss", folder / names["index"])
        m.update(format_version=FORMAT_VERSION, entries=table.to_json(), segments={seg_name(0): sum(map(len, blobs))},
                 generation=gen, next_seg=1, next_uid=N, names=names, files=describe_files(folder, list(names.values())))
        m["store"] = {**asdict(layout), "max_bytes": None, "eviction": "lru"}
        atomic_write_json(path, m)
        for old in ("maps.bin", "features.npy", "vectors.npy", "projector.safetensors", "index.faiss"):
            (folder / old).unlink(missing_ok=True)
    return True


def _fit_projector(store: MapStore, feats: np.ndarray, causal: bool, cfg: ProjectorConfig, progress: bool):
    rng = np.random.default_rng(cfg.seed)
    pairs = sample_pairs(store.lengths, cfg.pairs, rng)
    labels, per_head = pair_labels(store, pairs, cfg, causal, progress)
    proj, report = train(feats, pairs, labels, cfg, progress)
    # Stability: mean map distance per (layer, head) over the closest quarter of pairs.
    close = labels <= np.quantile(labels, 0.25)
    head_tv = per_head[close].mean(0) if close.any() else per_head.mean(0)
    layer_tv = head_tv.mean(1)
    report["layer_distance"] = [round(float(x), 5) for x in layer_tv]
    report["head_distance"] = [[round(float(x), 5) for x in row] for row in head_tv]
    report["in_dim"] = int(feats.shape[1])
    return proj, report, layer_tv


def _default_policy(layer_tv: np.ndarray, layers: list[int], fraction: float) -> dict:
    k = max(1, math.ceil(len(layers) * fraction))
    best = sorted(np.argsort(layer_tv, kind="stable")[:k].tolist())
    return {"layers": [layers[i] for i in best],
            "source": f"build: the {k} layers with the smallest map distance between close build inputs"}
