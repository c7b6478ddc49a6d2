"""``build`` and ``eval`` as Python functions (the CLI is a thin layer over these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import data as data_mod
from .. import models
from ..build import BuildConfig
from ..cache import AttnCache
from ..errors import UserError
from ..tasks import Comparison, compare, plan_rows, require_rows, run
from ..tiers import DEFAULT_PREFIX_BYTES
from .session import Session, input_limit, warn_skipped


def build(
    model_name: str,
    data: str,
    out: str,
    limit: int | None = None,
    cfg: BuildConfig | None = None,
    progress: bool = True,
    force: bool = False,
    strict: bool = False,
    max_tokens: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> AttnCache:
    """Record every model input of DATA with ``model_name`` and write a cache DB at ``out``."""
    model, tok = models.load(model_name, dtype=dtype, device=device)
    causal = models.model_kind(model.config) == "decoder"
    ds = data_mod.load(data, encoder=not causal, limit=limit, strict=strict)
    plan = plan_rows(ds.rows, tok, causal, input_limit(model, tok, max_tokens))
    warn_skipped(ds.skipped + plan.skipped, not progress)
    require_rows(plan)
    groups = [0] * len(plan.seqs)
    for r, row in reversed(
        list(enumerate(plan.rows))
    ):  # a sequence shared by rows belongs to the first
        for s in row.seqs:
            groups[s] = r
    return AttnCache.build(
        model, tok, plan.seqs, out, cfg, progress=progress, force=force, groups=groups
    )


@dataclass
class EvalResult:
    """One policy's cached pass against the exact pass (``comparison``) and what the cache did."""

    comparison: Comparison
    policy: str
    policy_layers: list[int]
    threshold: float
    reuse_fraction: float  # over every sequence run, those the prefix tier served included
    lookup_ms_per_item: float
    workload_speedup_rough: float | None  # exact seconds / cached seconds, same batch size
    batch_size: int
    skipped_rows: int
    prefix_cache: bool
    prefix_tokens_reused_fraction: float
    prefix_bytes_peak: int
    learned: int
    entries: int
    data: str
    device: str
    dtype: str

    def as_dict(self) -> dict:
        out = self.comparison.as_dict()
        out.update({k: v for k, v in asdict(self).items() if k != "comparison"})
        return out


def evaluate(
    db: str,
    data: str,
    policies: list[str] | None = None,
    threshold: float | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    model_name: str | None = None,
    strict: bool = False,
    prefix_bytes: int | None = DEFAULT_PREFIX_BYTES,
    quantize: str | None = None,
    max_tokens: int | None = None,
    learn: bool = False,
    max_bytes: int | None = None,
    eviction: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> list[EvalResult]:
    """Exact vs cached predictions on DATA, one result per policy (the exact pass is shared).

    The cached pass uses the exact prefix tier too (decoders; ``prefix_bytes=None`` switches it
    off). ``learn``: inputs that miss are recorded and inserted as the run goes (within the byte
    cap)."""
    if threshold is not None and threshold < 0:
        raise UserError(f"--threshold must be >= 0, got {threshold}")
    if learn and quantize:
        raise UserError(
            "--learn records maps on the model the DB was built with; it cannot be combined "
            "with --quantize"
        )
    s = Session.open(db, model_name, quantize, max_tokens, max_bytes, eviction, device, dtype)
    parsed = [
        s.cache.policy(spec) for spec in policies or ["default"]
    ]  # refuse bad specs before work
    plan = s.plan(data, limit, strict, quiet=not progress)
    exact = run(s.model, s.tokenizer, plan, batch_size, progress=progress, desc="exact")
    results = []
    for policy in parsed:
        s.cache.stats.reset()
        prefix = s.prefix_tier(prefix_bytes)
        with s.cache.attach(s.model, policy, threshold, learn=learn) as att:
            cached = run(
                s.model,
                s.tokenizer,
                plan,
                batch_size,
                attached=att,
                progress=progress,
                desc=f"cached ({policy.name})",
                prefix=prefix,
            )
        # hit counts for eviction and inspect (skipped if a writer holds the lock)
        s.cache.save_usage()
        st = s.cache.stats.as_dict()
        report = prefix.report() if prefix is not None else {}
        results.append(
            EvalResult(
                comparison=compare(plan, exact, cached),
                policy=policy.name,
                policy_layers=list(policy.layers),
                threshold=att.threshold,
                reuse_fraction=st["layer_maps_reused"] / (len(plan.seqs) * s.cache.shape.n_layers),
                lookup_ms_per_item=1000 * st["lookup_s"] / max(1, st["lookups"]),
                workload_speedup_rough=exact.seconds / cached.seconds if cached.seconds else None,
                batch_size=batch_size,
                skipped_rows=len(plan.skipped),
                prefix_cache=prefix is not None,
                prefix_tokens_reused_fraction=report.get("prefix_tokens_reused_fraction", 0.0),
                prefix_bytes_peak=int(report.get("prefix_bytes_peak", 0)),
                learned=att.learned,
                entries=len(s.cache.store),
                data=data,
                device=s.device,
                dtype=s.dtype,
            )
        )
    return results
