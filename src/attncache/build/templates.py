"""Making template maps: average the stored maps, and rank heads by what serving a template changes.

Some heads attend the same way whatever the input: attention sinks, previous-token and other
positional heads. For those the best "neighbour" is an average. Row ``i`` of a head's template is
the mean of row ``i`` of that head's map over the stored entries longer than ``i`` tokens
(``mean_maps``).

Which heads get templates is a measurement: ``rank`` orders heads by how much serving the template
changes the model's decisions on sample inputs, to first order (the attribution of each row's
decision margin), and calibration chooses how many of them fit the user's accuracy bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..db import MapStore, Templates
from ..errors import UserError
from ..inputs import collate, length_batches
from ..progress import Stage
from ..runtime.adapters import Adapter
from ..runtime.features import spans
from .record import AttentionTap

DEFAULT_MAX_LEN = (
    1024  # longest template kept (inputs longer than this compute template heads exactly)
)


def mean_maps(
    store: MapStore, max_len: int = DEFAULT_MAX_LEN, progress: bool = False
) -> np.ndarray:
    """[n_stored_layers, H, Lt, Lt] float32 mean maps over every entry (Lt: the longest, capped).

    Element (i, j) averages the entries that have it, i.e. those longer than max(i, j) tokens."""
    if len(store) == 0:
        raise UserError("the cache has no entries to average into templates")
    layers = store.layout.layers
    n_heads = store.layout.n_heads
    lt = int(min(max_len, int(store.lengths.max())))
    total = np.zeros((len(layers), n_heads, lt, lt), np.float32)
    count = np.zeros(lt + 1, np.int64)  # count[L]: entries of length min(L, lt)
    with Stage(len(store), "averaging maps", progress) as bar:
        for row in range(len(store)):
            length = min(int(store.lengths[row]), lt)
            count[length] += 1
            for pos, layer in enumerate(layers):
                crop = length if store.layout.causal else None
                total[pos, :, :length, :length] += (
                    store.layer(row, layer, crop).float().numpy()[:, :length, :length]
                )
            bar.update()
    cover = np.cumsum(count[::-1])[::-1][1:]  # cover[k] = #entries with min(len, lt) >= k + 1
    both = np.maximum.outer(np.arange(lt), np.arange(lt))
    total /= np.maximum(cover[both], 1).astype(np.float32)[None, None]  # in place: means can be GBs
    return total


def select(
    means: np.ndarray, stored_layers: list[int], order: list[tuple[int, int]], causal: bool
) -> Templates:
    """Keep the templates of ``order``'s heads (in that order) out of ``mean_maps``'s output,
    float16."""
    pos = {layer: i for i, layer in enumerate(stored_layers)}
    if order:
        maps = np.stack([means[pos[layer], h] for layer, h in order]).astype(np.float16)
    else:
        maps = np.zeros((0, means.shape[2], means.shape[3]), np.float16)
    return Templates([(int(a), int(b)) for a, b in order], maps, causal)


@dataclass
class Target:
    """What one sequence contributes to its row's decision: ``sum(weight * log p(token at
    from_end))``.

    For a choice row the weights are +1/norm on the exact best choice's tokens and -1/norm on the
    runner-up's, so the objective is the decision margin; the effects of one row's sequences add
    before the absolute value."""

    seq: int
    terms: list[tuple[int, int, float]]  # (from_end, token, weight)
    row: int


@dataclass
class RankData:
    """What ranking heads measures on: the model and its adapter, the templates (mean maps
    ``[n_stored_layers, H, L, L]``) of the stored layers, sample inputs and, for decoders, each
    row's answer ``targets`` (None: rank by how far each template is from the exact maps)."""

    model: nn.Module
    adapter: Adapter
    means: np.ndarray
    stored_layers: list[int]
    seqs: list[list[int]]
    targets: list[Target] | None


class _Ranker(AttentionTap):
    """Keeps every stored layer's maps (with gradients) and serves the ``fixed`` heads'
    templates."""

    def __init__(
        self,
        model,
        adapter: Adapter,
        layer_pos: dict[int, int],
        templates: torch.Tensor,
        fixed: dict[int, list[int]],
    ):
        super().__init__(model, adapter)
        self.layer_pos, self.templates, self.fixed = layer_pos, templates, fixed
        self.weights: dict[int, torch.Tensor] = {}
        self.spans: list = []

    def on_weights(self, layer, weights, value, out):
        if layer not in self.layer_pos:
            return out
        if weights.requires_grad:
            weights.retain_grad()
        self.weights[layer] = weights
        heads = self.fixed.get(layer)
        if not heads:
            return out
        edited = (
            weights.clone()
        )  # serve these heads' templates: rebuild the output from the edited maps
        for b, (start, end) in enumerate(self.spans):
            tm = self.templates[self.layer_pos[layer], heads, : end - start, : end - start]
            edited[b, heads, start:end, start:end] = (
                tm / tm.sum(-1, keepdim=True).clamp_min(1e-12)
            ).to(weights.dtype)
            edited[b, heads, :start] = 0
        group = weights.shape[1] // value.shape[1]
        return (edited @ value.repeat_interleave(group, dim=1)).transpose(1, 2).contiguous()


def rank(
    data: RankData,
    fixed: list[tuple[int, int]] = (),
    batch_size: int = 4,
    max_batch_elems: int = 4 * 256 * 256,
    progress: bool = False,
) -> np.ndarray:
    """[n_stored_layers, H] estimated output effect of serving each head's template (lower: safer).

    Decoders with ``targets``: first order (attribution), one forward and backward per sequence: the
    change of each row's decision margin is ``<d margin / d A, template - A>`` per head, summed over
    the row's sequences; the score is its mean absolute value over rows. Otherwise (encoders): the
    mean row-wise total variation between template and exact maps.

    ``fixed``: heads already served by their templates while measuring (scored +inf), so the
    estimate accounts for what earlier choices changed (``greedy_order``)."""
    model, adapter, means = data.model, data.adapter, data.means
    seqs, targets, stored_layers = data.seqs, data.targets, data.stored_layers
    n_layers, n_heads, lt = means.shape[0], means.shape[1], means.shape[2]
    pos = {layer: i for i, layer in enumerate(stored_layers)}
    tmpl = torch.from_numpy(means)
    by_seq: dict[int, list[Target]] = {}
    for t in targets or []:
        by_seq.setdefault(t.seq, []).append(t)
    use = [i for i in (sorted(by_seq) if targets else range(len(seqs))) if len(seqs[i]) <= lt]
    if not use:
        raise UserError(f"no sample input fits the templates ({lt} tokens); sample shorter inputs")
    signed: dict[int, np.ndarray] = {}  # per row: summed signed effects (attribution)
    tv = np.zeros((n_layers, n_heads))
    fixed_in: dict[int, list[int]] = {}
    for layer, h in fixed:
        fixed_in.setdefault(int(layer), []).append(int(h))
    device = next(model.parameters()).device
    # Gradients flow from the input embeddings, not into the weights (which stay frozen).
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, _i, o: o.detach().requires_grad_(True)
    )
    try:
        with (
            Stage(len(use), "ranking heads", progress) as bar,
            _Ranker(model, adapter, pos, tmpl, fixed_in) as ranker,
        ):
            for batch in length_batches([len(seqs[i]) for i in use], batch_size, max_batch_elems):
                idx = [use[j] for j in batch]
                inputs = collate([seqs[i] for i in idx], 0, adapter.causal, device)
                ranker.spans = spans(inputs["attention_mask"], *inputs["input_ids"].shape)
                ranker.weights.clear()
                if targets:
                    keep = max(f for i in idx for t in by_seq[i] for f, _, _ in t.terms)
                    with torch.enable_grad():
                        lp = torch.log_softmax(
                            model(**inputs, logits_to_keep=keep).logits.float(), -1
                        )
                        obj = sum(
                            w * lp[b, keep - f, tok]
                            for b, i in enumerate(idx)
                            for t in by_seq[i]
                            for f, tok, w in t.terms
                        )
                        obj.backward()
                else:
                    with torch.no_grad():
                        model(**inputs)
                for layer, w in ranker.weights.items():
                    p = pos[layer]
                    for b, (start, end) in enumerate(ranker.spans):
                        length = end - start
                        a = w[b, :, start:end, start:end].detach().float()
                        tm = tmpl[p, :, :length, :length]
                        tm = tm / tm.sum(-1, keepdim=True).clamp_min(1e-12)
                        if targets:
                            eff = (
                                (w.grad[b, :, start:end, start:end].float() * (tm - a))
                                .sum((-1, -2))
                                .numpy()
                            )
                            for t in by_seq[idx[b]]:
                                signed.setdefault(t.row, np.zeros((n_layers, n_heads)))[p] += eff
                        else:
                            tv[p] += 0.5 * (tm - a).abs().sum(-1).mean(-1).numpy()
                bar.update(len(idx))
    finally:
        hook.remove()
        for p in frozen:
            p.requires_grad_(True)
    score = np.mean([np.abs(v) for v in signed.values()], axis=0) if targets else tv / len(use)
    for layer, h in fixed:
        score[pos[layer], h] = np.inf
    return score


def greedy_order(
    data: RankData, n: int, rounds: int = 4, progress: bool = False
) -> tuple[list[tuple[int, int]], list[float]]:
    """The ``n`` heads to serve from templates, in order, chosen in ``rounds`` chunks: each chunk is
    ranked with the earlier chunks' templates in place, so interactions between heads are seen."""
    n_heads, stored_layers = data.means.shape[1], data.stored_layers
    order: list[tuple[int, int]] = []
    scores: list[float] = []
    for r in range(rounds):
        take = (n * (r + 1)) // rounds - len(order)
        if take <= 0:
            continue
        sc = rank(data, fixed=list(order), progress=progress)
        for i in np.argsort(sc.ravel(), kind="stable")[:take].tolist():
            order.append((stored_layers[i // n_heads], i % n_heads))
            scores.append(float(sc.ravel()[i]))
    return order, scores
