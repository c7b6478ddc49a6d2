"""Inserting entries under the byte cap: evict, compact the segments that lost entries, append;
staged as a new generation (``generation.stage``) that the caller publishes."""

from __future__ import annotations

import time

import numpy as np

from . import eviction as eviction_policies
from .generation import Generation, Snapshot, stage
from .index import VectorIndex
from .segments import EntryTable, MapStore, seg_name, seg_number, write_segment


def append_entries(
    db: Snapshot, blobs: list[bytes], lengths: list[int], feats: np.ndarray
) -> tuple[Generation | None, list[int]]:
    """Evict, compact and append as one staged generation (the caller holds the write lock,
    ``Database.writing``, and publishes it); None when nothing changes. The snapshot is not
    modified.

    Segments that lose an entry are rewritten: their live entries move into the new segment with the
    new ones, so evicted bytes are reclaimed on disk at once."""
    table = db.store.table
    sizes = [len(b) for b in blobs]
    keep_new = list(range(len(blobs)))
    evicted = np.zeros(len(table), dtype=bool)
    cap = db.manifest["store"].get("max_bytes")
    policy = db.manifest["store"].get("eviction", "lru")
    if cap is not None:
        fit, total = [], 0  # a batch that cannot fit even alone keeps its first entries that do
        for j in keep_new:
            if total + sizes[j] <= cap:
                fit.append(j)
                total += sizes[j]
        keep_new = fit
        evicted = eviction_policies.victims(table, policy, int(table.nbytes.sum()) + total - cap)
    if not keep_new and not evicted.any():
        return None, []
    # segments that lost an entry are rewritten: their live entries move into the new segment
    dirty = set(table.seg[evicted].tolist())
    moved = [i for i in range(len(table)) if not evicted[i] and int(table.seg[i]) in dirty]
    seg = int(db.manifest["next_seg"])
    out_blobs = [bytes(db.store.raw(i)) for i in moved] + [blobs[j] for j in keep_new]
    segments = {n: sz for n, sz in db.manifest["segments"].items() if seg_number(n) not in dirty}
    kept = np.flatnonzero(~evicted)
    new_table = table.take(kept)
    uid0 = int(db.manifest["next_uid"])
    if out_blobs:
        written = write_segment(db.folder, seg, out_blobs)
        segments[seg_name(seg)] = written.nbytes
        row_of = {int(i): r for r, i in enumerate(kept)}
        for k, i in enumerate(moved):
            new_table.seg[row_of[i]], new_table.offset[row_of[i]] = seg, written.offsets[k]
        fresh = written.tail(len(moved))  # the new entries follow the moved ones
        added = EntryTable.new(uid0, seg, fresh, [lengths[j] for j in keep_new], time.time())
        new_table = new_table.concat(added)
    new_feats = feats[keep_new]
    new_vectors = (
        db.projector.project(new_feats)
        if len(new_feats)
        else np.zeros((0, db.vectors.shape[1]), np.float32)
    )
    all_feats = np.concatenate([db.features()[kept], new_feats])
    vectors = np.concatenate([db.vectors[kept], new_vectors]).astype(np.float32)
    new_uids = np.arange(uid0, uid0 + len(keep_new), dtype=np.int64)
    if evicted.any() and not db.index.can_remove:
        index = VectorIndex.build(vectors, new_table.uid, approximate=db.index.approximate)
    else:
        index = db.index.copy()  # the live index changes only when the commit is published
        index.remove(table.uid[evicted])
        index.add(new_vectors, new_uids)
    m = dict(db.manifest)
    m.update(
        entries=new_table.to_json(),
        segments=segments,
        next_seg=seg + (1 if out_blobs else 0),
        next_uid=uid0 + len(keep_new),
        evictions=int(m.get("evictions", 0)) + int(evicted.sum()),
    )
    store = MapStore(db.folder, db.store.layout, new_table, segments, db.store.checked)
    draft = Generation(m, store, None, index, vectors)
    return stage(db.folder, draft, all_feats), new_uids.tolist()
