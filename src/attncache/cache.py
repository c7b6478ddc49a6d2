"""AttnCache: build / open / lookup / fetch / attach — ties record, store, projector and index together."""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import models
from .adapters import Adapter, Shape, get_adapter
from .errors import UserError
from .index import VectorIndex
from .inputs import collate, length_batches
from .policy import Policy, parse_policy
from .projector import Projector, ProjectorConfig, pair_labels, sample_pairs, train
from .record import Recorder
from .replay import Attached, Hit, Stats
from .store import (
    FORMAT_VERSION,
    MANIFEST,
    MapStore,
    MapWriter,
    StoreLayout,
    atomic_write_json,
    check_files,
    describe_files,
    load_npy,
    read_manifest,
    save_npy,
)

SEARCH_K = 64  # neighbours inspected per lookup to find the nearest length-compatible entry


@dataclass
class BuildConfig:
    store_dtype: str = "float16"
    layers: list[int] | None = None  # layers whose maps are stored (None: all)
    batch_size: int = 8
    max_batch_elems: int = 8 * 256 * 256  # cap on batch * T^2 while recording (memory)
    default_policy_fraction: float = 1 / 6  # share of layers the conservative default reuses
    threshold_quantile: float = 0.5  # of each entry's distance to its nearest other entry
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


class AttnCache:
    def __init__(self, folder: Path, manifest: dict, store: MapStore, projector: Projector, index: VectorIndex):
        self.folder = Path(folder)
        self.manifest = manifest
        self.store = store
        self.projector = projector
        self.index = index
        m = manifest["model"]
        self.adapter: Adapter = get_adapter(_Cfg(m["model_type"]))
        self.shape = Shape(m["n_layers"], m["n_heads"], m["n_kv_heads"], m["head_dim"])
        self.allow_crop: bool = manifest["allow_crop"]
        self.stats = Stats()

    # -- properties stored in the manifest --------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def default_layers(self) -> list[int]:
        return list(self.manifest["policy"]["layers"])

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
        return parse_policy(spec, self.shape.n_layers, self.shape.n_heads, self.manifest["policy"], self.head_distance)

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
        layers = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(shape.n_layers))
        layout = StoreLayout(shape.n_heads, layers, cfg.store_dtype)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
        try:
            writer = MapWriter(tmp, layout)
            feat_rows: list[np.ndarray] = []
            entry_groups: list[int] = []
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            device = next(model.parameters()).device
            bar = tqdm(total=len(seqs), desc="recording maps", disable=not progress)
            with torch.no_grad(), Recorder(model, adapter, layers) as rec:
                for batch in length_batches([len(s) for s in seqs], cfg.batch_size, cfg.max_batch_elems):
                    inputs = {k: v.to(device) for k, v in collate([seqs[i] for i in batch], pad, adapter.causal).items()}
                    model(**inputs, **({"logits_to_keep": 1} if adapter.causal else {}))
                    maps, f = rec.take()
                    for j, i in enumerate(batch):
                        writer.append(maps[j])
                        entry_groups.append(group_of[tuple(seqs[i])])
                        feat_rows.append(f[j])
                    bar.update(len(batch))
            bar.close()
            writer.close()
            feats = np.stack(feat_rows)
            store = MapStore(tmp, layout, writer.lengths, writer.offsets)
            manifest = _manifest(model, tokenizer, adapter, shape, layout, writer, cfg)
            proj, report, layer_tv = _fit_projector(store, feats, adapter.causal, cfg.projector, progress)
            manifest["projector"]["train"] = report
            manifest["projector"]["in_dim"] = int(feats.shape[1])
            vectors = proj.project(feats)
            index = VectorIndex.build(vectors)
            cache = cls(tmp, manifest, store, proj, index)
            manifest["threshold"] = cache._default_threshold(vectors, cfg.threshold_quantile, entry_groups)
            manifest["policy"] = _default_policy(layer_tv, layers, cfg.default_policy_fraction)
            save_npy(tmp / "features.npy", feats)
            save_npy(tmp / "vectors.npy", vectors)
            proj.save(tmp / "projector.safetensors")
            manifest["index"] = {"approximate": index.approximate, "ef_search": index.ef_search}
            if index.approximate:
                index.save(tmp / "index.faiss")
            manifest["files"] = describe_files(tmp)
            atomic_write_json(tmp / MANIFEST, manifest)  # the commit point
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(out)

    # -- open -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> AttnCache:
        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"cache DB '{folder}' does not exist")
        m = read_manifest(folder)
        problems = check_files(folder, m.get("files", {}))  # cheap: presence and sizes
        if problems:
            raise UserError(f"{folder}: damaged cache: {problems[0]}; run 'attncache verify {folder}' or rebuild")
        s = m["store"]
        layout = StoreLayout(s["n_heads"], s["layers"], s["dtype"])
        store = MapStore(folder, layout, m["entries"]["lengths"], m["entries"]["offsets"])
        p = m["projector"]
        try:
            proj = Projector.load(folder / "projector.safetensors", p["in_dim"], p["hidden"], p["out_dim"])
            vectors = load_npy(folder / "vectors.npy")
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: damaged cache ({e}); run 'attncache verify' or rebuild") from None
        if vectors.shape != (len(store), p["out_dim"]):
            raise UserError(f"{folder}: vectors.npy has shape {vectors.shape}, expected {(len(store), p['out_dim'])}")
        ix = m.get("index", {})
        if ix.get("approximate"):
            index = VectorIndex.load(folder / "index.faiss", p["out_dim"], ix.get("ef_search", 128))
        else:
            index = VectorIndex.build(vectors, approximate=False)
        return cls(folder, m, store, proj, index)

    @staticmethod
    def verify(folder: str | Path) -> list[str]:
        """Full integrity check: every data file present, of the recorded size and checksum; no extras."""
        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"cache DB '{folder}' does not exist")
        m = read_manifest(folder)
        return check_files(folder, m.get("files", {}), full=True)

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
        return hits

    def fetch(self, entry: int, layer: int, length: int, device=None) -> torch.Tensor:
        """[H, L, L] maps of one layer in the stored precision: a zero-copy memmap view on the CPU."""
        return torch.from_numpy(self.store.layer(entry, layer, length)).to(device=device)

    # -- attach -----------------------------------------------------------------------------------
    def attach(self, model: nn.Module, policy: str | Policy | None = None, threshold: float | None = None,
               **bench_hooks) -> Attached:
        """Context manager: while inside, every forward of ``model`` looks up and replays this cache."""
        thr = self.threshold if threshold is None else threshold
        return Attached(self, model, self.policy(policy), thr, **bench_hooks)

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

    def info(self) -> dict:
        lengths = self.store.lengths
        on_disk = sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())
        n = len(self.store)
        return {
            "db": str(self.folder),
            "format_version": self.manifest["format_version"],
            "model": self.manifest["model"]["name"],
            "model_type": self.manifest["model"]["model_type"],
            "entries": n,
            "bytes_on_disk": on_disk,
            "bytes_per_entry": on_disk / n if n else 0.0,
            "store_dtype": self.store.layout.dtype,
            "stored_layers": len(self.store.layout.layers),
            "length_min": int(lengths.min()) if n else 0,
            "length_median": float(np.median(lengths)) if n else 0.0,
            "length_max": int(lengths.max()) if n else 0,
            "threshold": self.threshold,
            "policy_layers": self.default_layers,
            "policy_heads": sum(len(h) for h in self.manifest["policy"].get("heads", {}).values()),
            "allow_crop": self.allow_crop,
            "index": "hnsw" if self.index.approximate else "flat",
            "projector_pearson": self.manifest["projector"].get("train", {}).get("pearson"),
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


class _Cfg:
    def __init__(self, model_type: str):
        self.model_type = model_type


def _unique(seqs: list[list[int]]) -> list[list[int]]:
    seen, out = set(), []
    for s in seqs:
        k = tuple(s)
        if k not in seen:
            seen.add(k)
            out.append(s)
    return out


def _manifest(model, tokenizer, adapter: Adapter, shape: Shape, layout: StoreLayout, writer: MapWriter,
              cfg: BuildConfig) -> dict:
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
        "store": asdict(layout),
        "entries": {"lengths": writer.lengths, "offsets": writer.offsets},
        "projector": {"in_dim": None, "hidden": cfg.projector.hidden, "out_dim": cfg.projector.out_dim,
                      "alpha": cfg.projector.alpha, "features": "mean layer-0 normalised token embeddings + log(L)"},
        "allow_crop": adapter.causal,
    }


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
