"""A folder that keeps the exact tiers across restarts (``--prefix-dir``): named tensor files.

Each file is safetensors (no pickle), written to a temporary name, fsynced and renamed;
``tiers.json`` (written last, atomically) records each file's size and sha256 and the model
fingerprint. Reading checks the fingerprint (another model's K/V would be wrong answers, so it is
refused) and the checksum (a damaged file is refused, not used). One writer at a time (the folder's
write lock); readers take none: a file the index names is whole or gone (a writer renames the new
one in, then deletes the old), and a reader that finds it gone reads the index again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..errors import UserError
from .files import atomic_write, atomic_write_json, file_digest, safe_name
from .locks import write_lock

INDEX = "tiers.json"
FORMAT = 1
# a save waits this long for another process's save (seconds for a large tree) rather than
# losing what this run would keep
LOCK_WAIT_S = 60.0

Tensors = dict[str, torch.Tensor | np.ndarray]


class TierFolder:
    def __init__(self, folder: str | Path, fingerprint: dict[str, str]):
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--prefix-dir '{self.folder}' is a file, not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)

    def _index(self) -> dict:
        path = self.folder / INDEX
        if not path.is_file():
            return {"format": FORMAT, "fingerprint": self.fingerprint, "files": {}}
        try:
            index = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: unreadable; remove the folder to start afresh") from None
        if index.get("format") != FORMAT:
            raise UserError(
                f"{path}: format {index.get('format')} is not supported; remove the folder"
            )
        fp = index.get("fingerprint", {})
        diff = [
            k
            for k in ("config", "weights", "tokenizer")
            if k in fp and fp.get(k) != self.fingerprint.get(k)
        ]
        if diff:
            raise UserError(
                f"{self.folder} holds the tiers of another model ({' and '.join(diff)} differ); "
                "use another --prefix-dir"
            )
        return index

    def read(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved under ``name``, or None if there are none (checked before use).

        Readers take no lock: a writer replaces a file under a new name and then deletes the old
        one, so a file named by the index is whole or gone. Gone means a writer committed since
        the index was read, and the read starts again from the new index."""
        meta = self._index()["files"].get(name)
        while meta is not None:
            path = self.folder / safe_name(meta["file"])
            try:
                if path.stat().st_size != meta["size"] or file_digest(path) != meta["sha256"]:
                    raise UserError(
                        f"{path} is damaged (size or checksum differs); not using it. Remove "
                        "it to start that tier afresh"
                    )
                return load_file(str(path))
            except (FileNotFoundError, RuntimeError):  # safetensors: RuntimeError for a lost file
                if path.exists():
                    raise
                now = self._index()["files"].get(name)
                if now == meta:  # the index still names it: not a writer's doing
                    raise UserError(
                        f"{path} is missing; not using the kept '{name}'. Remove {INDEX} to "
                        "start afresh"
                    ) from None
                meta = now
        return None

    def write(self, name: str, tensors: Tensors) -> None:
        """Replace ``name``'s tensors in one commit (the index is the commit point)."""
        with write_lock(self.folder, LOCK_WAIT_S):
            self._commit(name, tensors)

    def update(self, name: str, merge: Callable[[dict[str, torch.Tensor] | None], Tensors]) -> None:
        """Replace ``name``'s tensors by ``merge(the tensors there now, or None)`` in one commit,
        under the write lock: what another process wrote since this one read is merged, not
        lost."""
        with write_lock(self.folder, LOCK_WAIT_S):
            self._commit(name, merge(self.read(name)))

    def _commit(self, name: str, tensors: Tensors) -> None:
        """Write ``name``'s new file, then the index naming it, then drop the old file (under
        the write lock)."""
        index = self._index()
        old = index["files"].get(name, {}).get("file")
        file = f"{name}-{int(index.get('generation', 0)) + 1}.safetensors"
        data = {  # numpy arrays copied: ones made from bytes are read-only
            k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))).contiguous()
            for k, v in tensors.items()
        }
        atomic_write(self.folder / file, lambda f: f.write(save(data)))
        index["files"][name] = {
            "file": file,
            "size": (self.folder / file).stat().st_size,
            "sha256": file_digest(self.folder / file),
        }
        index["generation"] = int(index.get("generation", 0)) + 1
        index["fingerprint"] = self.fingerprint
        atomic_write_json(self.folder / INDEX, index)
        if old and old != file:
            (self.folder / safe_name(old)).unlink(missing_ok=True)
