"""Template maps: one stored map per (layer, head), served to every input with no lookup at all.

Some heads attend the same way whatever the input: attention sinks, previous-token and other positional
heads. For those, the best "neighbour" is an average. Row ``i`` of a head's template is the mean of row
``i`` of that head's map over the stored entries longer than ``i`` tokens. For a causal model row ``i``
depends only on tokens ``0..i``, so one template serves every length by a top-left crop (its rows already
sum to 1); for an encoder the crop's rows are renormalised (an approximation: a longer input's row spreads
mass over columns a shorter one lacks).

Which heads get templates is a measurement, not a guess: ``rank`` orders the heads by how much serving
the template changes the model's decisions on sample inputs (a first-order attribution of each row's
decision margin), and calibration (``calibrate.py``)
chooses how many of them fit the user's accuracy bound. A DB keeps the templates of the chosen heads only,
in rank order, as one ``[n, L, L]`` float16 array (``templates-<g>.npy``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UserError

DEFAULT_MAX_LEN = 1024  # longest template kept (inputs longer than this compute template heads exactly)


def mean_maps(store, max_len: int = DEFAULT_MAX_LEN, progress: bool = False) -> np.ndarray:
    """[n_stored_layers, H, Lt, Lt] float32 mean maps over every stored entry (Lt: the longest entry, capped).

    Element (i, j) averages the entries that have it, i.e. those longer than max(i, j) tokens.
    """
    if len(store) == 0:
        raise UserError("the cache has no entries to average into templates")
    layers = store.layout.layers
    H = store.layout.n_heads
    Lt = int(min(max_len, int(store.lengths.max())))
    total = np.zeros((len(layers), H, Lt, Lt), np.float32)
    count = np.zeros(Lt + 1, np.int64)  # count[L]: entries of length min(L, Lt)
    for e in tqdm(range(len(store)), desc="averaging maps", disable=not progress, leave=False):
        L = min(int(store.lengths[e]), Lt)
        count[L] += 1
        for pos, layer in enumerate(layers):
            total[pos, :, :L, :L] += store.layer(e, layer, L if store.layout.causal else None).float().numpy()[:, :L, :L]
    # entries covering index k: those with length > k
    cover = np.cumsum(count[::-1])[::-1][1:]  # cover[k] = #entries with min(len, Lt) >= k + 1
    both = np.maximum.outer(np.arange(Lt), np.arange(Lt))
    total /= np.maximum(cover[both], 1).astype(np.float32)[None, None]  # in place: MMLU-sized means are GBs
    return total


@dataclass
class Templates:
    """Template maps of some (layer, head) pairs, in rank order (the first has the least output effect)."""

    heads: list[tuple[int, int]]
    maps: np.ndarray  # [len(heads), Lt, Lt] (float16 on disk, memory-mapped)
    causal: bool
    _pos: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        assert self.maps.ndim == 3 and self.maps.shape[0] == len(self.heads), (self.maps.shape, len(self.heads))
        assert self.maps.shape[1] == self.maps.shape[2], self.maps.shape
        self._pos = {(int(layer), int(h)): i for i, (layer, h) in enumerate(self.heads)}

    @property
    def max_len(self) -> int:
        return int(self.maps.shape[1])

    def has(self, layer: int, heads) -> bool:
        return all((layer, h) in self._pos for h in heads)

    def get(self, layer: int, heads: tuple[int, ...], length: int) -> torch.Tensor:
        """[len(heads), L, L] float32 maps (cropped, rows summing to 1); the last few are kept in memory."""
        key = (layer, heads, length)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        if length > self.max_len:
            raise ValueError(f"no template longer than {self.max_len} tokens")
        idx = [self._pos[(layer, h)] for h in heads]
        m = torch.from_numpy(np.asarray(self.maps[idx, :length, :length], dtype=np.float32))
        m = m / m.sum(-1, keepdim=True).clamp_min(1e-12)
        with self._lock:
            if len(self._cache) >= 256:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = m
        return m

    @classmethod
    def select(cls, means: np.ndarray, stored_layers: list[int], order: list[tuple[int, int]], causal: bool) -> Templates:
        """Keep the templates of ``order``'s heads (in that order) out of ``mean_maps``'s output, as float16."""
        pos = {layer: i for i, layer in enumerate(stored_layers)}
        maps = np.stack([means[pos[layer], h] for layer, h in order]).astype(np.float16) if order else \
            np.zeros((0, means.shape[2], means.shape[3]), np.float16)
        return cls([(int(a), int(b)) for a, b in order], maps, causal)


# -- ranking: which heads can take a template ------------------------------------------------------
@dataclass
class Target:
    """What one sequence contributes to its row's decision: ``sum(weight * log p(token at from_end))``.

    For a choice row the weights are +1/norm on the exact best choice's tokens and -1/norm on the runner-up's,
    so the objective is the decision margin; the effects of one row's sequences add before the absolute value.
    """

    seq: int
    terms: list[tuple[int, int, float]]  # (from_end, token, weight)
    row: int


def rank(model, adapter, means: np.ndarray, stored_layers: list[int], seqs: list[list[int]],
         targets: list[Target] | None, batch_size: int = 4, max_batch_elems: int = 4 * 256 * 256,
         progress: bool = False, fixed: list[tuple[int, int]] = ()) -> np.ndarray:
    """[n_stored_layers, H] estimated output effect of serving each head's template (lower: safer).

    Decoders with ``targets``: first-order (attribution) estimate, one forward and backward per sequence:
    the change of each row's decision margin is ``<d margin / d A, template - A>`` per head, summed over the
    row's sequences; the score is its mean absolute value over rows. Otherwise (encoders): the mean
    row-wise total variation between template and exact maps.

    ``fixed``: heads already served by their templates while measuring (their scores are +inf), so the
    estimate accounts for what earlier choices changed (``greedy_order``).
    """
    from .inputs import collate, length_batches
    from .patch import patched
    from .record import eager_attention, spans

    n_layers, H = means.shape[0], means.shape[1]
    pos = {layer: i for i, layer in enumerate(stored_layers)}
    Lt = means.shape[2]
    T = torch.from_numpy(means)
    by_seq: dict[int, list[Target]] = {}
    for t in targets or []:
        by_seq.setdefault(t.seq, []).append(t)
    use = sorted(by_seq) if targets else list(range(len(seqs)))
    use = [i for i in use if len(seqs[i]) <= Lt]
    if not use:
        raise UserError(f"no sample input fits the templates ({Lt} tokens); sample shorter inputs")
    signed: dict[int, np.ndarray] = {}  # per row: summed signed effects (attribution)
    tv = np.zeros((n_layers, H))
    n_tv = 0
    weights: dict[int, torch.Tensor] = {}
    fixed_in: dict[int, list[int]] = {}
    for layer, h in fixed:
        fixed_in.setdefault(int(layer), []).append(int(h))
    cur: dict = {}

    def on_forward(inputs):
        weights.clear()
        B, Tn = inputs.input_ids.shape
        cur["spans"] = spans(inputs.attention_mask, B, Tn)

    def on_attention(layer, module, original, hidden, args, kwargs):
        out, w = original(hidden, *args, **kwargs)
        if layer in pos:
            assert w is not None and w.dim() == 4, "eager attention returned no weights"
            if w.requires_grad:
                w.retain_grad()
            weights[layer] = w
            hs = fixed_in.get(layer)
            if hs:  # serve these heads' templates: rebuild the output from the edited maps
                edited = w.clone()
                for b, (s, e) in enumerate(cur["spans"]):
                    tm = T[pos[layer], hs, : e - s, : e - s]
                    edited[b, hs, s:e, s:e] = (tm / tm.sum(-1, keepdim=True).clamp_min(1e-12)).to(w.dtype)
                    edited[b, hs, :s] = 0
                shape = adapter.shape(model.config)
                v = adapter.values(module, hidden, shape).repeat_interleave(shape.group, dim=1)
                out = adapter.output(module, edited @ v)
        return out, w

    device = next(model.parameters()).device
    bar = tqdm(total=len(use), desc="ranking heads", disable=not progress, leave=False)
    # Gradients flow from the input embeddings, not into the weights (which stay frozen).
    frozen = [p_ for p_ in model.parameters() if p_.requires_grad]
    for p_ in frozen:
        p_.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, _i, o: o.detach().requires_grad_(True))
    try:
        with eager_attention(model), patched(model, adapter, on_forward, on_attention):
            for batch in length_batches([len(seqs[i]) for i in use], batch_size, max_batch_elems):
                idx = [use[j] for j in batch]
                inputs = {k: v.to(device) for k, v in collate([seqs[i] for i in idx], 0, adapter.causal).items()}
                B, Tn = inputs["input_ids"].shape
                sp = spans(inputs["attention_mask"], B, Tn)
                if targets:
                    keep = max(f for i in idx for t in by_seq[i] for f, _, _ in t.terms)
                    with torch.enable_grad():
                        lp = torch.log_softmax(model(**inputs, logits_to_keep=keep).logits.float(), -1)
                        obj = sum(w * lp[b, keep - f, tok] for b, i in enumerate(idx) for t in by_seq[i]
                                  for f, tok, w in t.terms)
                        obj.backward()
                else:
                    with torch.no_grad():
                        model(**inputs)
                for layer, w in weights.items():
                    p = pos[layer]
                    for b, (s, e) in enumerate(sp):
                        L = e - s
                        a = w[b, :, s:e, s:e].detach().float()
                        tm = T[p, :, :L, :L]
                        tm = tm / tm.sum(-1, keepdim=True).clamp_min(1e-12)
                        if targets:
                            g = w.grad[b, :, s:e, s:e].float()
                            eff = (g * (tm - a)).sum((-1, -2)).numpy()
                            for t in by_seq[idx[b]]:
                                acc = signed.setdefault(t.row, np.zeros((n_layers, H)))
                                acc[p] += eff  # the objective already carries the target's weights
                        else:
                            tv[p] += 0.5 * (tm - a).abs().sum(-1).mean(-1).numpy()
                n_tv += len(idx)
                bar.update(len(idx))
    finally:
        hook.remove()
        for p_ in frozen:
            p_.requires_grad_(True)
        bar.close()
    score = np.mean([np.abs(v) for v in signed.values()], axis=0) if targets else tv / max(n_tv, 1)
    for layer, h in fixed:
        score[pos[layer], h] = np.inf
    return score


def greedy_order(model, adapter, means: np.ndarray, stored_layers: list[int], seqs, targets, n: int,
                 rounds: int = 4, progress: bool = False) -> tuple[list[tuple[int, int]], list[float]]:
    """The ``n`` heads to serve from templates, in order, chosen in ``rounds`` chunks: each chunk is ranked
    with the earlier chunks' templates already in place, so interactions between heads are seen."""
    H = means.shape[1]
    order: list[tuple[int, int]] = []
    scores: list[float] = []
    for r in range(rounds):
        take = (n * (r + 1)) // rounds - len(order)
        if take <= 0:
            continue
        sc = rank(model, adapter, means, stored_layers, seqs, targets, progress=progress, fixed=list(order))
        for i in np.argsort(sc.ravel(), kind="stable")[:take].tolist():
            order.append((stored_layers[i // H], i % H))
            scores.append(float(sc.ravel()[i]))
    return order, scores
