"""The commit protocol in two places: ``stage`` builds a new generation aside (its files written
under new names, nothing live touched); ``Database.publish`` commits it (the manifest replaced
atomically) and only then makes it the live one.

A failure while staging (a full disk, say) leaves the live ``Database`` exactly as it was, so the
same process's next commit starts from the committed state. Files a failed stage wrote are never
referenced and are removed by the next commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import describe_files, safe_name, save_npy
from .index import VectorIndex
from .projector import Projector
from .segments import MapStore


@dataclass
class Snapshot:
    """What a commit is computed from: the live state, read only."""

    folder: Path
    manifest: dict
    store: MapStore
    projector: Projector
    index: VectorIndex
    vectors: np.ndarray
    features: Callable[[], np.ndarray]


@dataclass
class Generation:
    """A staged generation; None fields stay as the live ones are."""

    manifest: dict
    store: MapStore | None = None
    projector: Projector | None = None
    index: VectorIndex | None = None
    vectors: np.ndarray | None = None


def stage(folder: Path, draft: Generation, feats: np.ndarray) -> Generation:
    """Write a generation's small files (``feats``, and ``draft``'s vectors, projector and index)
    under new names and describe them in a new manifest, ``draft.manifest`` updated (not
    modified). ``draft.projector`` None keeps the current one; ``draft.store`` is handed on."""
    if draft.index is None or draft.vectors is None:
        raise ValueError("a generation's draft needs its index and vectors")
    m, vectors, projector, index = dict(draft.manifest), draft.vectors, draft.projector, draft.index
    gen = int(m.get("generation", -1)) + 1 if "files" in m else int(m.get("generation", 0))
    old = m.get("names", {})
    names = {"features": f"features-{gen}.npy", "vectors": f"vectors-{gen}.npy"}
    save_npy(folder / names["features"], feats)
    save_npy(folder / names["vectors"], vectors)
    if projector is not None:
        names["projector"] = f"projector-{gen}.safetensors"
        projector.save(folder / names["projector"])
    else:
        names["projector"] = safe_name(old.get("projector"))
    for kind in ("templates", "memo"):  # not rewritten: they do not depend on the entries
        if kind in old:
            names[kind] = safe_name(old[kind])
    m["index"] = {"approximate": index.approximate, "ef_search": index.ef_search}
    if index.approximate:
        names["index"] = f"index-{gen}.faiss"
        index.save(folder / names["index"])
    m.update(generation=gen, names=names, files=describe_files(folder, list(names.values())))
    return Generation(m, draft.store, projector, index, vectors)


def stage_side_file(
    folder: Path, m: dict, kind: str, ext: str, write: Callable[[Path], None] | None
) -> Generation:
    """A generation that only replaces (or, ``write`` None, drops) a file that does not depend on
    the entries (templates, memo)."""
    from .manifest import generation_files

    m = dict(m)
    gen = int(m.get("generation", 0)) + 1
    names = dict(generation_files(m))
    names.pop(kind, None)
    if write is not None:
        names[kind] = f"{kind}-{gen}.{ext}"
        write(folder / names[kind])
    m.update(generation=gen, names=names, files=describe_files(folder, list(names.values())))
    return Generation(m)
