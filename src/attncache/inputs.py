"""Batching token sequences into model inputs.

Decoders are padded on the left so that the last position of every row is real (``logits_to_keep=1``
then reads every item's next-token logits), with position ids counted from each row's first real
token, so a padded row computes exactly what it would alone. Encoders are padded on the right as
usual.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def collate(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    causal: bool,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for a batch, built on ``device`` (the model's: pass it; None means torch's
    default)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        row = torch.tensor(s, dtype=torch.long, device=device)
        span = slice(width - len(s), width) if causal else slice(0, len(s))
        ids[b, span] = row
        mask[b, span] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if causal:
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    else:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def length_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Indices grouped by similar length (less padding); ``max_tokens`` caps batch * T^2 work."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        T = lengths[i]
        if batch and (
            len(batch) >= batch_size or (max_tokens and (len(batch) + 1) * T * T > max_tokens)
        ):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
