"""One DB folder, opened: the committed manifest and everything it references, and the ways to
commit.

``Database.open`` returns one object holding the map store, projector, index, vectors and (lazily)
the template maps of one generation. Readers never block; every write below takes the folder's write
lock, first re-reads the manifest if another writer committed meanwhile (``writing``), then commits
by writing new files under new names, the manifest last, and deleting what it no longer references.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from . import eviction as eviction_policies
from .compaction import append_entries
from .files import MANIFEST, atomic_write_json, load_npy, save_npy
from .generation import Generation, Snapshot, stage
from .index import EF_SEARCH, VectorIndex
from .locks import opening, write_lock
from .manifest import (
    ModelInfo,
    Shape,
    check_files,
    generation_files,
    read_manifest,
    remove_unreferenced,
)
from .projector import Projector
from .segments import EntryTable, MapStore, StoreLayout, seg_number
from .side_files import SideFiles
from .staging import aside_of
from .templates import Templates
from .usage import UsageCounter

OPEN_RETRIES = 5


@dataclass
class StoredMaps:
    """Maps already written to segments: their entries, each segment's size, the layout."""

    table: EntryTable
    segments: dict[str, int]
    layout: StoreLayout


@dataclass
class LookupParts:
    """What finds an entry: each entry's features, the projector, its index and the vectors."""

    feats: np.ndarray
    projector: Projector
    index: VectorIndex
    vectors: np.ndarray


class Database(SideFiles):
    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        store: MapStore,
        projector: Projector,
        index: VectorIndex,
        vectors: np.ndarray,
    ):
        self.folder = Path(folder)
        self.manifest = manifest
        self.store = store
        self.projector = projector
        self.index = index
        self.vectors = vectors
        self.usage = UsageCounter()
        self._templates: tuple[str, Templates] | None = None
        self._writing = False

    # -- what the manifest says, typed ----------------------------------------------------------
    @property
    def model(self) -> ModelInfo:
        return ModelInfo.from_json(self.manifest["model"])

    @property
    def shape(self) -> Shape:
        return self.model.shape

    @property
    def causal(self) -> bool:
        return bool(self.manifest["model"]["causal"])

    @property
    def allow_crop(self) -> bool:
        """A causal entry serves a shorter input by its top-left crop (exact for the entry's
        prefix)."""
        return bool(self.manifest["allow_crop"])

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def policy_json(self) -> dict:
        return dict(self.manifest["policy"])

    @property
    def max_bytes(self) -> int | None:
        return self.manifest["store"].get("max_bytes")

    @property
    def eviction(self) -> str:
        return self.manifest["store"].get("eviction", "lru")

    @property
    def train_report(self) -> dict:
        return dict(self.manifest["projector"].get("train", {}))

    @property
    def head_distance(self) -> np.ndarray | None:
        """[n_layers, H] build-time map distance per (layer, head) (stored layers; others +inf)."""
        per_head = self.train_report.get("head_distance")
        if per_head is None:
            return None
        out = np.full((self.shape.n_layers, self.shape.n_heads), np.inf)
        out[self.store.layout.layers] = np.asarray(per_head)
        return out

    def features(self) -> np.ndarray:
        return load_npy(self.folder / generation_files(self.manifest)["features"])

    def rows_of(self, uids: np.ndarray) -> np.ndarray:
        """Table rows of entry uids (uids grow with the row: every insert appends larger ones)."""
        return np.searchsorted(self.store.table.uid, uids)

    # -- open and verify ------------------------------------------------------------------------
    @classmethod
    def open(
        cls, folder: str | Path, max_bytes: int | None = None, eviction: str | None = None
    ) -> Database:
        """Open a DB for reading. ``max_bytes``/``eviction`` override the stored cap for later
        inserts."""
        folder = Path(folder)
        if not folder.exists():
            aside = aside_of(folder)
            if aside is not None:
                raise UserError(
                    f"cache DB '{folder}' does not exist: a replace (build/compress --force) was "
                    f"interrupted and the previous DB is whole at '{aside}'; rename it back, or "
                    "run the build again (it restores it first)"
                )
            raise UserError(f"cache DB '{folder}' does not exist")
        for attempt in range(OPEN_RETRIES):
            try:
                with opening(folder):
                    db = cls._read(folder)
                    db.preload()  # side files taken while no writer may delete them
                break
            except FileNotFoundError:  # a writer committed and removed an old generation meanwhile
                if attempt == OPEN_RETRIES - 1:
                    raise UserError(
                        f"{folder}: files keep disappearing while opening; is a writer "
                        "replacing it?"
                    ) from None
                time.sleep(0.05)
        if eviction is not None:
            db.manifest["store"]["eviction"] = eviction_policies.check(eviction)
        if max_bytes is not None:
            if max_bytes <= 0:
                raise UserError(f"--max-bytes must be positive, got {max_bytes}")
            db.manifest["store"]["max_bytes"] = int(max_bytes)
        return db

    @classmethod
    def _read(cls, folder: Path) -> Database:
        manifest = read_manifest(folder)
        problems = check_files(folder, manifest)  # cheap: presence and sizes
        if problems:
            raise UserError(
                f"{folder}: damaged cache: {problems[0]}; run 'attncache verify {folder}' "
                "or rebuild"
            )
        try:
            s = manifest["store"]
            layout = StoreLayout(s["n_heads"], s["layers"], s["codec"], s.get("eps"), s["causal"])
            table = EntryTable.from_json(manifest["entries"])
            p = manifest["projector"]
            names = generation_files(manifest)
        except (KeyError, TypeError) as e:
            raise UserError(f"{folder}: malformed manifest (missing {e})") from None
        if len(table) > 1 and not np.all(np.diff(table.uid) > 0):
            raise UserError(f"{folder}: malformed manifest (entry uids out of order)")
        store = MapStore(folder, layout, table, manifest["segments"])
        try:
            projector = Projector.load(
                folder / names["projector"], p["in_dim"], p["hidden"], p["out_dim"]
            )
            vectors = load_npy(folder / names["vectors"])
        except (ValueError, RuntimeError) as e:
            raise UserError(
                f"{folder}: damaged cache ({e}); run 'attncache verify' or rebuild"
            ) from None
        if vectors.shape != (len(store), p["out_dim"]):
            raise UserError(
                f"{folder}: vectors have shape {vectors.shape}, expected "
                f"{(len(store), p['out_dim'])}"
            )
        ix = manifest.get("index", {})
        index = None
        if ix.get("approximate") and "index" in names:
            index = VectorIndex.load(
                folder / names["index"], p["out_dim"], ix.get("ef_search", EF_SEARCH)
            )
        if index is None:
            index = VectorIndex.build(
                vectors, table.uid, approximate=bool(ix.get("approximate")) or None
            )
        return cls(folder, manifest, store, projector, index, vectors)

    @staticmethod
    def verify(folder: str | Path) -> list[str]:
        """Every file present, of its recorded size and checksum, every entry's crc32; no foreign
        files."""
        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"cache DB '{folder}' does not exist")
        return check_files(folder, read_manifest(folder), full=True)

    # -- writing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, lock_wait_s: float = 10.0) -> Iterator[Database]:
        """Hold the write lock, catch up with other writers' commits, merge this process's usage."""
        with write_lock(self.folder, lock_wait_s):
            self._sync()
            self.usage.merge_into(self.store.table)
            self.manifest["entries"] = self.store.table.to_json()
            self._writing = True
            try:
                yield self
            finally:
                self._writing = False

    def _sync(self) -> None:
        on_disk = read_manifest(self.folder)
        same = on_disk.get("generation") == self.manifest.get("generation") and on_disk.get(
            "entries"
        ) == self.manifest.get("entries")
        if not same:
            fresh = Database._read(self.folder)
            fresh.preload()
            keep = {
                k: self.manifest["store"][k]
                for k in ("max_bytes", "eviction")
                if k in self.manifest["store"]
            }
            self.manifest, self.store, self.projector = fresh.manifest, fresh.store, fresh.projector
            self.index, self.vectors = fresh.index, fresh.vectors
            self._templates, self._memo_blob = fresh._templates, fresh._memo_blob
            self.manifest["store"].update(keep)

    def commit_settings(self, lock_wait_s: float = 10.0, **fields: Any) -> None:
        """Set manifest fields (threshold, policy, calibration) in one commit."""
        with self.writing(lock_wait_s):
            self.manifest.update(fields)
            atomic_write_json(self.folder / MANIFEST, self.manifest)

    def save_usage(self, lock_wait_s: float = 2.0) -> bool:
        """Write this process's hit counts into the manifest (for eviction and ``inspect``). False
        if the lock could not be had in time (the counts are kept for the next try)."""
        if not self.usage:
            return True
        try:
            with self.writing(lock_wait_s):
                atomic_write_json(self.folder / MANIFEST, self.manifest)
            return True
        except UserError:
            return False

    def snapshot(self) -> Snapshot:
        """The live state a commit is computed from (``generation.py``)."""
        return Snapshot(
            self.folder,
            self.manifest,
            self.store,
            self.projector,
            self.index,
            self.vectors,
            self.features,
        )

    def commit_entries(
        self, blobs: list[bytes], lengths: list[int], feats: np.ndarray, lock_wait_s: float = 10.0
    ) -> list[int]:
        """Append encoded entries, evicting (LRU/LFU) to stay within the byte cap; returns their
        uids."""
        with self.writing(lock_wait_s):
            feats = np.asarray(feats, dtype=np.float32)
            gen, uids = append_entries(self.snapshot(), blobs, lengths, feats)
            if gen is not None:
                self.publish(gen)
            return uids

    def commit_cap(self, max_bytes: int, lock_wait_s: float = 10.0) -> int:
        """Set the byte cap and evict (reclaiming disk) until the segments hold at most it."""
        with self.writing(lock_wait_s):
            self.manifest["store"]["max_bytes"] = int(max_bytes)
            before = len(self.store)
            empty = np.zeros((0, self.projector.in_dim), np.float32)
            gen, _ = append_entries(self.snapshot(), [], [], empty)
            if gen is not None:
                self.publish(gen)
            return before - len(self.store)

    def write_generation(
        self,
        m: dict,
        feats: np.ndarray,
        vectors: np.ndarray,
        projector: Projector | None,
        index: VectorIndex,
    ) -> None:
        """Stage a generation's small files under new names, then publish it. Only while writing
        (``writing``) or into a folder being built (``create``)."""
        assert self._writing, "write_generation needs the write lock (Database.writing)"
        self.publish(stage(self.folder, Generation(m, None, projector, index, vectors), feats))

    def publish(self, gen: Generation) -> None:
        """Commit a staged generation (the manifest replaced atomically: the commit point), then
        make it the live one and drop the files nothing references. If the commit fails, nothing
        live has changed."""
        assert self._writing, "publish needs the write lock (Database.writing)"
        atomic_write_json(self.folder / MANIFEST, gen.manifest)
        self.manifest = gen.manifest
        if gen.store is not None:
            self.store = gen.store
        if gen.projector is not None:
            self.projector = gen.projector
        if gen.index is not None:
            self.index = gen.index
        if gen.vectors is not None:
            self.vectors = gen.vectors
        remove_unreferenced(self.folder, gen.manifest)

    def _commit(self, m: dict) -> None:
        """Commit a manifest that references only files already committed or staged."""
        self.publish(Generation(m))

    @classmethod
    def create(
        cls,
        folder: Path,
        manifest: dict,
        stored: StoredMaps,
        lookup: LookupParts,
        templates: Templates | None = None,
    ) -> Database:
        """Commit generation 0 into ``folder`` (a staging folder under its write lock: see
        ``staging``). ``templates``: template maps to keep (``manifest["templates"]`` describes
        them)."""
        table, segments = stored.table, stored.segments
        projector, index, vectors = lookup.projector, lookup.index, lookup.vectors
        next_uid = max(
            int(manifest.get("next_uid", 0)), int(table.uid.max()) + 1 if len(table) else 0
        )
        manifest = {
            **manifest,
            "entries": table.to_json(),
            "segments": dict(segments),
            "generation": 0,
            "next_seg": max((seg_number(n) for n in segments), default=-1) + 1,
            "next_uid": next_uid,
            "names": {},
        }
        manifest.pop("files", None)
        if templates is not None:
            manifest["names"]["templates"] = "templates-0.npy"
            save_npy(folder / "templates-0.npy", np.asarray(templates.maps, dtype=np.float16))
        else:
            manifest.pop("templates", None)
        store = MapStore(folder, stored.layout, table, segments)
        db = cls(folder, manifest, store, projector, index, vectors)
        db._writing = True
        db.write_generation(manifest, lookup.feats, vectors, projector, index)
        db._writing = False
        return db
