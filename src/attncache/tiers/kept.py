"""The prefix tier's tree, bound to the numerics that computed its K/V, kept across restarts.

K/V depend on the numerics that computed them: the tree belongs to one ``models.numerics`` (a
model moved to another dtype or device starts a new tree), and a kept tree is stored under its
numerics' name (``kept_name``), so a bfloat16 run's K/V never reach a float32 run.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import models
from ..errors import UserError
from .radix import RadixKV, from_tensors, merge_into, to_tensors


def kept_name(numerics: str) -> str:
    """The name a kept tree of these numerics has in a ``db.TierFolder``."""
    return f"prefix.{numerics}"


class NumericsTree:
    """A ``RadixKV`` holding K/V of ``model``'s current numerics only."""

    def __init__(self, model: nn.Module, max_bytes: int):
        self.model = model
        self.numerics = models.numerics(model)
        self.device = next(model.parameters()).device
        self.tree = RadixKV(max_bytes)

    def follow(self) -> None:
        """A model moved to another dtype or device since the tree was built starts a new tree:
        K/V computed in other numerics would make the tier inexact."""
        now = models.numerics(self.model)
        if now != self.numerics:
            self.numerics = now
            self.device = next(self.model.parameters()).device
            self.reset()

    def reset(self) -> None:
        self.tree = RadixKV(self.tree.max_bytes)

    def save(self, folder) -> None:
        """Keep the tree in a ``db.TierFolder`` (``--prefix-dir``): a restart starts warm. What
        another process kept there since is merged in under the folder's write lock (this
        tree's paths the most recent), not replaced; the byte cap is this tree's."""
        self.follow()

        def merged(there: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
            if there is None:
                return to_tensors(self.tree)
            kept = from_tensors(there, self.tree.max_bytes)
            merge_into(kept, self.tree)
            return to_tensors(kept)

        folder.update(kept_name(self.numerics), merged)

    def load(self, folder) -> bool:
        """Take the tree a ``db.TierFolder`` holds for this model's numerics (checksummed, for
        this model); False if none."""
        self.follow()
        data = folder.read(kept_name(self.numerics))
        if data is None:
            return False
        self.restore(data)
        return True

    def restore(self, data: dict[str, torch.Tensor]) -> None:
        """Start from a kept tree (``folder.read(kept_name(numerics))``); ``data`` stays
        unchanged, so one read can start several tiers. K/V of another dtype are refused."""
        self.follow()
        kv = data.get("kv")
        dtype = next(self.model.parameters()).dtype
        if kv is not None and kv.numel() and kv.dtype != dtype:
            raise UserError(
                f"the kept prefix K/V are {str(kv.dtype).replace('torch.', '')}, the model runs "
                f"in {str(dtype).replace('torch.', '')}; K/V of other numerics are not exact"
            )
        self.tree = from_tensors(
            {k: v.to(self.device) if k == "kv" else v for k, v in data.items()}, self.tree.max_bytes
        )
