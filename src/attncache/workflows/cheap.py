"""eval's cheap pass: the exact tiers in a cheaper precision, verified by margin (``tasks.verify``).

``--verify-margin X`` reruns in the model's own precision every row whose cheap margin is under X;
``auto`` first calibrates X on the job's first rows (both precisions over them; the bound is
measured on the half that did not choose X) and runs cheap only where the device has the
precision natively (``native_speedup``), the bound holds and the calibration rows say it pays
(their cheap pass plus the share that would rerun, against their exact pass); otherwise every
row runs exactly and the report says why. ``off`` (the default) never runs a cheap pass.

Without ``--cheap-dtype``, ``auto`` picks the shape of the cast too: the whole model in bfloat16
first (the faster pass where margins are wide: SST-2), and where that would not pay because many
rows would rerun, only the linear layers (``-linears``: the gaps move a third as far, so fewer
rows rerun: MMLU), calibrated on the same rows against the same exact pass.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace

from torch import nn

from ..errors import UserError
from ..tasks import Plan, RunOptions, RunOutput, Tiers, run
from ..tasks.precisions import LINEARS, cheap_copy, cheap_precision, native_speedup
from ..tasks.verify import Precision, calibrate_gate, run_verified
from ..tiers import PrefixTier
from .session import Session

MIN_PROBE_SPEEDUP = 1.2  # auto: the cheap precision's matmul must be this much faster
PAYS = 0.9  # auto: the verified pass must be expected to take under this share of the exact one
# a whole-model cheap pass rerunning this share tries ``-linears`` next (or, given, names it)
MANY_RERUNS = 0.1
WHOLE = "bfloat16"  # the default cheap precision, and auto's first shape


@dataclass(frozen=True)
class VerifyOptions:
    margin: str = "off"  # "off", "auto" or a threshold (the task's score units)
    # the cheap precision (``tasks.precisions.cheap_precision``); None: bfloat16, and under
    # auto bfloat16-linears after it where the whole cast reruns many rows and would not pay
    dtype: str | None = None
    max_loss: float = 0.02  # auto: the bound on changed answers the gate must meet
    calibrate_rows: int = 300  # auto: the job's first rows calibrate the gate
    confidence: float = 0.95

    def __post_init__(self) -> None:  # the CLI checks its flags; a library caller gets the same
        if not valid_margin(self.margin):
            raise UserError(f"margin must be off, auto or a number >= 0, got '{self.margin}'")
        if not 0.0 < self.max_loss < 1.0:
            raise UserError(f"max_loss must be in (0, 1), got {self.max_loss}")
        if not 0.0 < self.confidence < 1.0:
            raise UserError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.calibrate_rows < 1:
            raise UserError(f"calibrate_rows must be at least 1, got {self.calibrate_rows}")

    @property
    def on(self) -> bool:
        return self.margin != "off"


def valid_margin(text: str) -> bool:
    """``--verify-margin``'s values: off, auto or a threshold >= 0 (not nan)."""
    if text in ("off", "auto"):
        return True
    try:
        return float(text) >= 0.0  # False for nan
    except ValueError:
        return False


@dataclass
class VerifyReport:
    margin: str
    dtype: str
    probe_speedup: float
    used: bool  # False: every row ran exactly (``reason`` says why)
    threshold: float | None = None
    fallback_share: float | None = None  # rows that reran exactly, of those the cheap pass ran
    calibration_rows: int = 0  # auto: rows answered by the calibration's exact pass
    cheap_seconds: float = 0.0
    exact_seconds: float = 0.0
    calibration_seconds: float = 0.0
    gate: dict | None = None  # auto: the calibrated gate and its bound (of ``dtype``)
    reason: str = ""
    tried: list[str] = field(default_factory=list)  # auto: the shapes calibrated, in order
    warning: str = ""  # a given margin on a device that emulates the precision: slower

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
    name = verify.dtype or WHOLE
    precision = cheap_precision(name)
    if next(s.model.parameters()).dtype == precision.dtype:
        raise UserError(f"--verify-margin: the model already runs in {name}")
    probe = native_speedup(precision.dtype, s.device)
    report = VerifyReport(verify.margin, name, probe, used=False)
    if verify.margin == "auto" and probe < MIN_PROBE_SPEEDUP:
        report.reason = _not_faster(name, probe)
        return CheapPass(None, report)
    max_bytes = exact.prefix.tree.max_bytes if exact.prefix is not None else None
    if verify.margin == "auto":
        chosen = _calibrate(s, plan, opts, verify, report, max_bytes)
        if chosen is None:
            return CheapPass(None, report)
        cheap_model, threshold = chosen.model, chosen.threshold
        # the calibration rows keep the exact answers their gate was measured against; the
        # cheap pass answers the rest
        done = plan.subset_seqs(list(range(chosen.rows)))
        todo = _closed(plan, range(chosen.rows, len(plan.rows)))
        opts = replace(opts, seq_ids=sorted(todo), into=chosen.exact.placed(done, len(plan.seqs)))
        report.calibration_rows = sum(not todo.intersection(r.seqs) for r in plan.rows)
    else:
        cheap_model, threshold = cheap_copy(s.model, precision), float(verify.margin)
        if probe < MIN_PROBE_SPEEDUP:  # the user asked for it: run it, but say what it costs
            report.warning = (
                f"{_not_faster(name, probe)}: the cheap pass may take longer than the exact one; "
                "--verify-margin auto would run every row exactly"
            )
            print(f"attncache: warning: {report.warning}", file=sys.stderr)
    got = run_verified(
        s.tokenizer,
        plan,
        Precision(cheap_model, _own_tiers(cheap_model, max_bytes, exact.memo)),
        Precision(s.model, exact),
        threshold,
        opts,
    )
    got.out.seconds += report.calibration_seconds  # what the job paid for its gate
    report.used, report.threshold = True, threshold
    report.fallback_share = got.fallback_share
    report.cheap_seconds, report.exact_seconds = got.cheap_seconds, got.exact_seconds
    return CheapPass(got.out, report)


def _not_faster(name: str, probe: float) -> str:
    return f"{name} is not faster on this device (probe {probe:.2f}x)"


def _closed(plan: Plan, rows: range) -> set[int]:
    """The sequences of ``rows`` and of every row sharing one with them, transitively, so each
    row has all its sequences in the set or none: a margin is then all cheap or all exact (the
    gate bounds gaps between two cheap scores, not a cheap and an exact one)."""
    seqs = {q for r in rows for q in plan.rows[r].seqs}
    while True:
        grown = {q for r in plan.rows if seqs.intersection(r.seqs) for q in r.seqs}
        if grown == seqs:
            return seqs
        seqs = grown


def _own_tiers(model, max_bytes: int | None, memo) -> Tiers:
    """A prefix tree per precision, never shared (the memo keys answers by numerics)."""
    return Tiers(prefix=PrefixTier(model, max_bytes) if max_bytes else None, memo=memo)


@dataclass
class Calibrated:
    model: nn.Module  # the cheap copy whose gate held and pays
    threshold: float
    exact: RunOutput  # the calibration rows' exact pass (the subset plan's numbering)
    rows: int  # the job's first rows, which calibrated


def _calibrate(
    s: Session,
    plan: Plan,
    opts: RunOptions,
    verify: VerifyOptions,
    report: VerifyReport,
    max_bytes: int | None,
) -> Calibrated | None:
    """auto: the first shape whose gate holds and pays on the job's first rows (one exact pass
    over them serves every shape); None with ``report.reason`` saying why where none does."""
    calib = plan.subset(list(range(min(verify.calibrate_rows, len(plan.rows)))))
    quiet = RunOptions(batch_size=opts.batch_size, progress=opts.progress, desc="calibrate")
    high = run(s.model, s.tokenizer, calib, quiet, _own_tiers(s.model, max_bytes, None))
    report.calibration_seconds = high.seconds
    reasons = []
    for name in [verify.dtype] if verify.dtype else [WHOLE, WHOLE + LINEARS]:
        precision = cheap_precision(name)
        cheap_model = cheap_copy(s.model, precision)
        low = run(cheap_model, s.tokenizer, calib, quiet, _own_tiers(cheap_model, max_bytes, None))
        gate = calibrate_gate(calib, low, high, verify.max_loss, verify.confidence)
        report.calibration_seconds += low.seconds
        report.dtype, report.gate = name, gate.as_dict()
        report.tried.append(name)
        if not gate.holds:
            reasons.append(
                f"{name}: the gate's bound {gate.bound:.3f} on {gate.verify_rows} rows exceeds "
                f"--max-loss {verify.max_loss:g}"
            )
            break  # too few rows to bound: another shape's gate has no more of them
        # the calibration rows' verified pass: their cheap pass plus the exact pass over the
        # share that would rerun
        if low.seconds + gate.fallback_share * high.seconds < PAYS * high.seconds:
            return Calibrated(cheap_model, gate.threshold, high, len(calib.rows))
        reasons.append(
            f"{name}: the cheap pass would not pay, {low.seconds:.1f} s cheap + "
            f"{gate.fallback_share:.0%} rerun of {high.seconds:.1f} s exact on the calibration rows"
        )
        if precision.linears_only or gate.fallback_share < MANY_RERUNS:
            break
        del cheap_model  # one cheap copy in memory at a time
        if verify.dtype:  # the user chose the shape: say which one moves margins less
            reasons[-1] += (
                f" (with margins this small, --cheap-dtype {name}{LINEARS} moves them less and "
                "reruns fewer rows)"
            )
    report.reason = "; ".join(reasons) + ": every row ran exactly"
    return None
