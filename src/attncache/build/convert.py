"""``compress``: a copy of a DB with every map re-encoded by another codec.

Projector, vectors, threshold and policy are kept, so lookups hit exactly the same entries and only
the maps' precision differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..db import (
    Database,
    EntryTable,
    LookupParts,
    SegmentWriter,
    StoredMaps,
    StoreLayout,
    staging,
)
from ..db.codecs import get_codec
from ..progress import Stage


def compress(
    db: Database,
    out: str | Path,
    codec: str,
    sparse_eps: float | None = None,
    progress: bool = True,
    force: bool = False,
) -> None:
    coder = get_codec(codec, sparse_eps)
    old = db.store.layout
    layout = StoreLayout(
        old.n_heads, old.layers, coder.name, getattr(coder, "eps", None), old.causal
    )
    with staging(Path(out), force) as folder:
        table = db.store.table
        writer = SegmentWriter(folder, layout)
        with Stage(len(table), f"re-encoding ({codec})", progress) as bar:
            for row in range(len(table)):
                length = int(table.length[row])
                writer.add(
                    np.stack([db.store.layer(row, x, length).float().numpy() for x in old.layers])
                )
                bar.update()
        written, segments = writer.finish()
        # the same entries under the same uids and usage, at their new places
        new = EntryTable(
            table.uid.copy(),
            written.seg,
            written.offset,
            written.nbytes,
            table.length.copy(),
            written.crc,
            table.hits.copy(),
            table.last_used.copy(),
        )
        manifest = json.loads(json.dumps(db.manifest))
        manifest["store"].update(codec=layout.codec, eps=layout.eps)
        lookup = LookupParts(db.features(), db.projector, db.index, db.vectors)
        Database.create(
            folder, manifest, StoredMaps(new, segments, layout), lookup, templates=db.templates
        )
