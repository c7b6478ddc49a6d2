"""Format 1 -> 2, in place: ``maps.bin`` (dense float16, no headers) becomes one segment with layer
headers."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import UserError
from .files import MANIFEST, atomic_write_json, describe_files, load_npy, save_npy
from .locks import write_lock
from .manifest import FORMAT_VERSION
from .segments import EntryTable, StoreLayout, encode_entry, seg_name, write_segment

_OLD_FILES = ("maps.bin", "features.npy", "vectors.npy", "projector.safetensors", "index.faiss")


def migrate(folder: str | Path) -> bool:
    """Convert a format-1 DB; False if it is already current."""
    folder = Path(folder)
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
        dtype = np.dtype(s.get("dtype", "float16"))
        raw = np.memmap(folder / "maps.bin", dtype=np.uint8, mode="r")
        n_layers, n_heads = len(layout.layers), layout.n_heads
        blobs = []
        for length, start in zip(m["entries"]["lengths"], m["entries"]["offsets"], strict=True):
            n = n_layers * n_heads * length * length * dtype.itemsize
            maps = raw[start : start + n].view(dtype).reshape(n_layers, n_heads, length, length)
            blobs.append(encode_entry(layout, maps))
        written = write_segment(folder, 0, blobs)
        table = EntryTable.new(0, 0, written, m["entries"]["lengths"])
        names = {
            "features": "features-1.npy",
            "vectors": "vectors-1.npy",
            "projector": "projector-1.safetensors",
        }
        save_npy(folder / names["features"], load_npy(folder / "features.npy"))
        save_npy(folder / names["vectors"], load_npy(folder / "vectors.npy"))
        shutil.copyfile(folder / "projector.safetensors", folder / names["projector"])
        if (folder / "index.faiss").exists():
            names["index"] = "index-1.faiss"
            shutil.copyfile(folder / "index.faiss", folder / names["index"])
        m.update(
            format_version=FORMAT_VERSION,
            entries=table.to_json(),
            segments={seg_name(0): written.nbytes},
            generation=1,
            next_seg=1,
            next_uid=len(blobs),
            names=names,
            files=describe_files(folder, list(names.values())),
        )
        m["store"] = {**asdict(layout), "max_bytes": None, "eviction": "lru"}
        atomic_write_json(path, m)
        for old in _OLD_FILES:
            (folder / old).unlink(missing_ok=True)
    return True
