"""The commands as Python functions (the CLI is a thin layer over these)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from . import data as data_mod
from . import models
from .cache import AttnCache, BuildConfig
from .errors import UserError
from .prefix import DEFAULT_PREFIX_BYTES, PrefixRunner, supports_prefix
from .tasks import Plan, compare, plan_rows, require_rows, run


def _max_len(model, tokenizer, cap: int | None = None) -> int | None:
    n = getattr(model.config, "max_position_embeddings", None)
    if cap is not None:
        n = min(n, cap) if n else cap
    t = getattr(tokenizer, "model_max_length", None)
    if t is not None and t < 10**6:
        n = min(n, t) if n else t
    return n


def _warn(msgs: list[str], quiet: bool) -> None:
    if msgs and not quiet:
        for m in msgs[:5]:
            print(f"skipped {m}", file=sys.stderr)
        if len(msgs) > 5:
            print(f"... and {len(msgs) - 5} more skipped rows", file=sys.stderr)


def build(model_name: str, data: str, out: str, limit: int | None = None, cfg: BuildConfig | None = None,
          progress: bool = True, force: bool = False, strict: bool = False, max_tokens: int | None = None) -> AttnCache:
    """Record every model input of DATA with ``model_name`` and write a cache DB at ``out``."""
    model, tok = models.load(model_name)
    causal = models.model_kind(model.config) == "decoder"
    ds = data_mod.load(data, encoder=not causal, limit=limit, strict=strict)
    plan = plan_rows(ds.rows, tok, causal, _max_len(model, tok, max_tokens))
    _warn(ds.skipped + plan.skipped, not progress)
    require_rows(plan)
    groups = [0] * len(plan.seqs)
    for r, row in reversed(list(enumerate(plan.rows))):  # a sequence shared by rows belongs to the first
        for s in row.seqs:
            groups[s] = r
    return AttnCache.build(model, tok, plan.seqs, out, cfg, progress=progress, force=force, groups=groups)


def quantize_int8(model):
    """torch's CPU dynamic int8 quantization of every Linear (weights int8, activations quantized on the fly).

    The maps were recorded on the fp32 model; replay only needs ``v_proj``/``o_proj`` to be callable, which
    quantized linears are.
    """
    import warnings

    import torch

    fp = getattr(model, "_attncache_fingerprint", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    q._attncache_fingerprint = fp  # the identity check refers to the weights the maps came from
    return q


@dataclass
class Session:
    """An opened DB with its model loaded and checked: what eval, bench and serve start from."""

    cache: AttnCache
    model: object
    tokenizer: object
    max_tokens: int | None = None  # rows with a longer input are skipped (reported)

    @classmethod
    def open(cls, db: str, model_name: str | None = None, quantize: str | None = None,
             max_tokens: int | None = None, max_bytes: int | None = None, eviction: str | None = None) -> Session:
        cache = AttnCache.open(db, max_bytes=max_bytes, eviction=eviction)
        model, tok = models.load(model_name or cache.manifest["model"]["name"])
        cache.check_model(model)  # on the weights the DB was built with; the result stays on the model
        cache.check_tokenizer(tok)
        if quantize == "int8":
            model = quantize_int8(model)
        elif quantize is not None:
            raise UserError(f"--quantize: only 'int8' is supported, got '{quantize}'")
        return cls(cache, model, tok, max_tokens)

    def prefix_runner(self, max_bytes: int | None) -> PrefixRunner | None:
        """A fresh exact prefix tier, for decoders whose cache keeps every key (no sliding windows)."""
        if max_bytes is None or not self.cache.adapter.causal or not supports_prefix(self.model):
            return None
        return PrefixRunner(self.model, max_bytes)

    def plan(self, data: str, limit: int | None = None, strict: bool = False, quiet: bool = False) -> Plan:
        ds = data_mod.load(data, encoder=not self.cache.adapter.causal, limit=limit, strict=strict)
        max_len = _max_len(self.model, self.tokenizer, self.max_tokens)
        plan = plan_rows(ds.rows, self.tokenizer, self.cache.adapter.causal, max_len)
        _warn(ds.skipped + plan.skipped, quiet)
        require_rows(plan)
        return plan


def evaluate(db: str, data: str, policies: list[str] | None = None, threshold: float | None = None,
             limit: int | None = None, batch_size: int = 8, progress: bool = True,
             model_name: str | None = None, strict: bool = False, prefix_bytes: int | None = DEFAULT_PREFIX_BYTES,
             quantize: str | None = None, max_tokens: int | None = None, learn: bool = False,
             max_bytes: int | None = None, eviction: str | None = None) -> list[dict]:
    """Exact vs cached predictions on DATA, one result per policy (the exact pass is shared).

    The cached pass uses the exact prefix tier too (decoders; ``prefix_bytes=None`` switches it off).
    ``learn``: inputs that miss are recorded and inserted as the run goes (within the byte cap).
    """
    if threshold is not None and threshold < 0:
        raise UserError(f"--threshold must be >= 0, got {threshold}")
    if learn and quantize:
        raise UserError("--learn records maps on the model the DB was built with; it cannot be combined with --quantize")
    s = Session.open(db, model_name, quantize, max_tokens, max_bytes, eviction)
    parsed = [s.cache.policy(spec) for spec in policies or ["default"]]  # refuse bad specs before any work
    plan = s.plan(data, limit, strict, quiet=not progress)
    exact = run(s.model, s.tokenizer, plan, batch_size, progress=progress, desc="exact")
    results = []
    for policy in parsed:
        s.cache.stats.reset()
        prefix = s.prefix_runner(prefix_bytes)
        with s.cache.attach(s.model, policy, threshold, learn=learn) as att:
            cached = run(s.model, s.tokenizer, plan, batch_size, attached=att, progress=progress,
                         desc=f"cached ({policy.name})", prefix=prefix)
        s.cache.save_usage()  # hit counts for eviction and inspect (skipped if a writer holds the lock)
        res = compare(plan, exact, cached)
        st = s.cache.stats.as_dict()
        res.update({
            "policy": policy.name,
            "policy_layers": list(policy.layers),
            "threshold": att.threshold,
            # over every sequence run, including those the prefix tier served without a lookup
            "reuse_fraction": st["layer_maps_reused"] / (len(plan.seqs) * s.cache.shape.n_layers),
            "lookup_ms_per_item": 1000 * st["lookup_s"] / max(1, st["lookups"]),
            "workload_speedup_rough": exact.seconds / cached.seconds if cached.seconds else None,
            "batch_size": batch_size,
            "skipped_rows": len(plan.skipped),
            "prefix_cache": prefix is not None,
            "prefix_tokens_reused_fraction": prefix.stats.as_dict()["prefix_tokens_reused_fraction"] if prefix else 0.0,
            "prefix_bytes_peak": prefix.tree.peak_bytes if prefix else 0,
            "learned": att.learned,
            "entries": len(s.cache.store),
            "data": data,
        })
        results.append(res)
    return results
