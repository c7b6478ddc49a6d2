"""The files of a DB generation that do not depend on its entries: template maps and the result
memo. Both are taken while the DB is opened, under the readers' lock (``preload``): the templates
memory-mapped, the memo's bytes read, so a writer that commits a new generation and deletes the old
files afterwards cannot pull them from under a reader. Each is committed as a new generation on its
own (the entries, index and projector files carry over unchanged)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load, save

from ..errors import UserError
from .files import atomic_write, load_npy, safe_name, save_npy
from .generation import stage_side_file
from .manifest import generation_files
from .templates import Templates

if TYPE_CHECKING:
    from contextlib import AbstractContextManager


class SideFiles:
    """Template maps and the memo of ``Database`` (which provides ``folder``, ``manifest``,
    ``causal``, ``writing`` and ``_commit``)."""

    folder: Path
    manifest: dict
    causal: bool
    _templates: tuple[str, Templates] | None = None
    _memo_blob: tuple[str, bytes] | None = None  # (file name, its bytes), read at open

    def preload(self) -> None:
        """Take this generation's side files now (called inside ``opening``)."""
        self.templates  # noqa: B018 - maps the file while it is certain to exist
        name = self.manifest.get("names", {}).get("memo")
        if name is not None:
            self._memo_blob = (name, (self.folder / safe_name(name)).read_bytes())

    def writing(self, lock_wait_s: float = 10.0) -> AbstractContextManager: ...  # Database's

    def _commit(self, m: dict) -> None: ...  # Database's

    @property
    def templates(self) -> Templates | None:
        """The template maps this generation stores, if any (memory-mapped on first use)."""
        name = self.manifest.get("names", {}).get("templates")
        if name is None:
            return None
        if self._templates is None or self._templates[0] != name:
            maps = load_npy(self.folder / generation_files(self.manifest)["templates"], mmap=True)
            heads = [(int(a), int(b)) for a, b in self.manifest["templates"]["heads"]]
            if maps.ndim != 3 or maps.shape[0] != len(heads):
                raise UserError(
                    f"{self.folder}: template maps have shape {maps.shape} for {len(heads)} "
                    "heads; run 'attncache verify' or calibrate again"
                )
            self._templates = (name, Templates(heads, maps, self.causal))
        return self._templates[1]

    def memo_arrays(self) -> dict[str, np.ndarray] | None:
        """The result memo this generation stores, as arrays (``tiers/memo.py`` reads them), or
        None."""
        name = self.manifest.get("names", {}).get("memo")
        if name is None:
            return None
        if self._memo_blob is not None and self._memo_blob[0] == name:
            blob = self._memo_blob[1]
        else:  # a writer's own newer generation (it holds the write lock: the file stays)
            blob = (self.folder / safe_name(name)).read_bytes()
        if hashlib.sha256(blob).hexdigest() != self.manifest["files"][name]["sha256"]:
            raise UserError(
                f"{self.folder}: {name} does not match its checksum (damaged); not using it. "
                f"Run 'attncache verify {self.folder}'"
            )
        return {k: v.numpy() for k, v in load(blob).items()}

    def commit_memo(
        self, merge: Callable[[dict | None], dict[str, np.ndarray]], lock_wait_s: float = 10.0
    ) -> bool:
        """Store ``merge(what is on disk now)`` as the memo in one commit; False if the lock
        could not be had in time."""
        try:
            with self.writing(lock_wait_s):
                arrays = merge(self.memo_arrays())
                tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}  # copies
                m = dict(self.manifest)
                m["memo"] = {"entries": int(len(arrays["keys"]))}
                blob = save(tensors)
                self._commit_side_file(
                    m,
                    "memo",
                    "safetensors",
                    lambda path: atomic_write(path, lambda f: f.write(blob)),
                )
            return True
        except UserError:
            return False

    def commit_templates(
        self, templates: Templates | None, info: dict | None = None, lock_wait_s: float = 10.0
    ) -> None:
        """Store (or, with None, drop) template maps; the stored policy keeps only heads that have
        one."""
        with self.writing(lock_wait_s):
            m = dict(self.manifest)
            m.pop("templates", None)
            have = set(templates.heads) if templates is not None else set()
            if "fixed" in m["policy"]:
                fixed = {
                    k: [h for h in hs if (int(k), h) in have]
                    for k, hs in m["policy"]["fixed"].items()
                }
                m["policy"] = {**m["policy"], "fixed": {k: v for k, v in fixed.items() if v}}
            if templates is None:
                self._commit_side_file(m, "templates", "npy", None)
                return
            m["templates"] = {
                **(info or {}),
                "heads": [list(x) for x in templates.heads],
                "max_len": templates.max_len,
            }
            maps = np.asarray(templates.maps, dtype=np.float16)
            self._commit_side_file(m, "templates", "npy", lambda path: save_npy(path, maps))

    def _commit_side_file(
        self, m: dict, kind: str, ext: str, write: Callable[[Path], None] | None
    ) -> None:
        """Commit ``m`` as a new generation whose ``kind`` file (one that does not depend on the
        entries: templates, memo) is written by ``write`` under a new name, or dropped (None)."""
        self._commit(stage_side_file(self.folder, m, kind, ext, write).manifest)
