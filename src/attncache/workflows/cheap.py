"""eval's cheap pass: the exact tiers in a cheaper precision, verified by margin (``tasks.verify``).

``--verify-margin X`` reruns in the model's own precision every row whose cheap margin is under X;
``auto`` first calibrates X on the job's first rows (both precisions over them; the bound is
measured on the half that did not choose X) and runs cheap only where the device has the
precision natively (``native_speedup``), the bound holds and the calibration rows say it pays
(their cheap pass plus the share that would rerun, against their exact pass); otherwise every
row runs exactly and the report says why. ``off`` (the default) never runs a cheap pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError
from ..tasks import Plan, RunOptions, RunOutput, Tiers, run
from ..tasks.precisions import LINEARS, cheap_copy, cheap_precision, native_speedup
from ..tasks.verify import Precision, calibrate_gate, run_verified
from ..tiers import PrefixTier
from .session import Session

MIN_PROBE_SPEEDUP = 1.2  # auto: the cheap precision's matmul must be this much faster
PAYS = 0.9  # auto: the verified pass must be expected to take under this share of the exact one
MANY_RERUNS = 0.1  # a whole-model cheap pass that reruns this share is told of ``-linears``


@dataclass(frozen=True)
class VerifyOptions:
    margin: str = "off"  # "off", "auto" or a threshold (the task's score units)
    dtype: str = "bfloat16"  # the cheap precision (``tasks.precisions.cheap_precision``)
    max_loss: float = 0.02  # auto: the bound on changed answers the gate must meet
    calibrate_rows: int = 300  # auto: the job's first rows calibrate the gate
    confidence: float = 0.95

    @property
    def on(self) -> bool:
        return self.margin != "off"


@dataclass
class VerifyReport:
    margin: str
    dtype: str
    probe_speedup: float
    used: bool  # False: every row ran exactly (``reason`` says why)
    threshold: float | None = None
    fallback_share: float | None = None  # rows that reran exactly, of all rows
    cheap_seconds: float = 0.0
    exact_seconds: float = 0.0
    calibration_seconds: float = 0.0
    gate: dict | None = None  # auto: the calibrated gate and its bound
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheapPass:
    out: RunOutput | None  # None: run the usual exact pass instead
    report: VerifyReport


def verified_pass(
    s: Session, plan: Plan, opts: RunOptions, verify: VerifyOptions, exact: Tiers
) -> CheapPass:
    """The cached pass in the cheap precision with rows under the margin rerun through
    ``exact`` (the model's own tiers and memo); ``out`` None where it does not run."""
    precision = cheap_precision(verify.dtype)
    if next(s.model.parameters()).dtype == precision.dtype:
        raise UserError(f"--verify-margin: the model already runs in {verify.dtype}")
    probe = native_speedup(precision.dtype, s.device)
    report = VerifyReport(verify.margin, verify.dtype, probe, used=False)
    if verify.margin == "auto" and probe < MIN_PROBE_SPEEDUP:
        report.reason = f"{verify.dtype} is not faster on this device (probe {probe:.2f}x)"
        return CheapPass(None, report)
    cheap_model = cheap_copy(s.model, precision)

    def own_tiers(model, memo) -> Tiers:  # a prefix tree per precision, never shared
        max_bytes = exact.prefix.tree.max_bytes if exact.prefix is not None else None
        return Tiers(prefix=PrefixTier(model, max_bytes) if max_bytes else None, memo=memo)

    if verify.margin == "auto":
        calib = plan.subset(list(range(min(verify.calibrate_rows, len(plan.rows)))))
        quiet = RunOptions(batch_size=opts.batch_size, progress=opts.progress, desc="calibrate")
        low = run(cheap_model, s.tokenizer, calib, quiet, own_tiers(cheap_model, None))
        high = run(s.model, s.tokenizer, calib, quiet, own_tiers(s.model, None))
        gate = calibrate_gate(calib, low, high, verify.max_loss, verify.confidence)
        report.gate = gate.as_dict()
        report.calibration_seconds = low.seconds + high.seconds
        if not gate.holds:
            report.reason = (
                f"the gate's bound {gate.bound:.3f} on {gate.verify_rows} rows exceeds "
                f"--max-loss {verify.max_loss:g}: every row ran exactly"
            )
            return CheapPass(None, report)
        # what the calibration rows cost each way, the verified pass as its cheap pass plus the
        # exact pass over the rows that rerun
        expected = low.seconds + gate.fallback_share * high.seconds
        if expected >= PAYS * high.seconds:
            report.reason = (
                f"the cheap pass would not pay: {low.seconds:.1f} s cheap + "
                f"{gate.fallback_share:.0%} rerun of {high.seconds:.1f} s exact on the "
                "calibration rows: every row ran exactly"
            )
            if not precision.linears_only and gate.fallback_share >= MANY_RERUNS:
                report.reason += (
                    f" (with margins this small, --cheap-dtype {verify.dtype}{LINEARS} "
                    "moves them less and reruns fewer rows)"
                )
            return CheapPass(None, report)
        threshold = gate.threshold
    else:
        threshold = float(verify.margin)
    got = run_verified(
        s.tokenizer,
        plan,
        Precision(cheap_model, own_tiers(cheap_model, exact.memo)),
        Precision(s.model, exact),
        threshold,
        opts,
    )
    got.out.seconds += report.calibration_seconds  # what the job paid for its gate
    report.used, report.threshold = True, threshold
    report.fallback_share = got.fallback_share
    report.cheap_seconds, report.exact_seconds = got.cheap_seconds, got.exact_seconds
    return CheapPass(got.out, report)
