"""The calibration search: the setting with the most reuse whose disagreement bound fits, found
cheaply.

Reuse of a (policy, threshold) setting is known before any pass: template heads serve every input
that fits them, and the share of inputs whose nearest entry is within a threshold follows from the
lookups alone (``lookup_distances``). Only feasibility (the bound) needs a cached pass. So
candidates are taken best-first and

- a candidate whose largest possible reuse is no better than the best setting found is skipped;
- a pass runs in chunks of rows and stops as soon as, at every threshold that would beat the best
  setting, more rows already changed than the bound allows (the count can only grow);
- a retrieval pass takes rows in order of their nearest entry's distance: a row can only change at
  thresholds at or above it, so after each chunk the counts below the next row's distance are final,
  the pass ends once no open threshold lies beyond, and rows that never hit never run;
- template heads are searched by bisection over their count (more heads change more answers).

``exhaustive`` runs every candidate to the end (the pre-search behaviour, for comparisons).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..build.calibrate import Mixture, allowed_changes, binom_upper, change_counts
from ..inputs import length_batches
from ..progress import Stage
from ..runtime import Policy, nearest
from ..runtime.features import features
from ..tasks import Plan, RunOptions, RunOutput, Tiers, mix, row_prediction, run
from .session import Session

CHUNKS = 8  # a pass is checked against the bound this many times


@torch.no_grad()
def lookup_distances(s: Session, plan: Plan, batch_size: int = 32) -> list[float]:
    """Per sequence, the predicted distance to its nearest compatible entry (inf: none), no model
    pass."""
    model, adapter = s.model, s.cache.adapter
    device = next(model.parameters()).device
    out = [float("inf")] * len(plan.seqs)
    for batch in length_batches([len(x) for x in plan.seqs], batch_size):
        for i in batch:  # one at a time: no padding, the exact features a lookup computes
            seq = plan.seqs[i]
            feats = features(model, adapter, torch.tensor([seq], device=device), [(0, len(seq))])
            hit = nearest(s.cache.db, feats, [len(seq)], float("inf"))[0]
            out[i] = hit.distance if hit is not None else float("inf")
    return out


@dataclass
class Setting:
    policy: Policy
    threshold: float
    reuse: float
    changes: int
    base: RunOutput | None = None  # what a miss outputs
    cached: RunOutput | None = None  # the policy's pass (threshold infinity)


@dataclass
class SearchOptions:
    """What a search promises (at most ``max_loss`` of its rows' answers changed, at confidence
    ``conf``) and how it runs."""

    max_loss: float
    conf: float
    batch_size: int
    progress: bool
    deadline: float | None = None  # ``time.monotonic()`` after which no candidate starts
    exhaustive: bool = False  # every candidate at every threshold (slow; for checking)


class Search:
    """Chooses the setting that reuses most within the bound on ``rows`` of ``plan``, whose
    exact outputs are ``exact``."""

    def __init__(
        self, s: Session, plan: Plan, rows: list[int], exact: RunOutput, opts: SearchOptions
    ):
        self.s, self.plan, self.rows, self.exact = s, plan, rows, exact
        self.batch_size, self.progress = opts.batch_size, opts.progress
        self.deadline, self.exhaustive = opts.deadline, opts.exhaustive
        self.max_loss, self.conf = opts.max_loss, opts.conf
        self.c_max = allowed_changes(len(rows), opts.max_loss, opts.conf)
        self.seqs = seqs = self._seq_ids(rows)
        self.distances = lookup_distances(s, plan)
        finite = sorted({self.distances[q] for q in seqs if np.isfinite(self.distances[q])})
        self.thresholds = np.array([-1.0] + finite)
        d = np.array([self.distances[q] for q in seqs])
        self.hit_rate = np.array([float(np.mean(d <= t)) for t in self.thresholds])
        tmax = s.cache.templates.max_len if s.cache.templates is not None else 0
        self.template_share = (
            float(np.mean([len(plan.seqs[q]) <= tmax for q in seqs])) if seqs else 0.0
        )
        self.none = Setting(Policy({}, s.cache.shape.n_heads, "none"), -1.0, 0.0, 0, exact, exact)
        self.best = self.none
        self.tried = 0
        self.passes = 0.0  # cached passes run, in units of whole passes over the rows
        self.stopped_early = False  # the time limit ended the search
        order = np.random.default_rng(0).permutation(len(rows))
        self.chunks = [
            [rows[i] for i in part] for part in np.array_split(order, min(CHUNKS, len(rows)))
        ]

    # -- what a setting reuses, before running anything
    # ---------------------------------------------
    def reuse(self, policy: Policy) -> np.ndarray:
        """Share of all (layer, head) maps reused, per threshold."""
        c = self.s.cache
        n_layers = c.shape.n_layers
        fixed = policy.fixed_maps() / n_layers * self.template_share if policy.fixed else 0.0
        per_hit = policy.head_maps(c.store.layer_pos) / n_layers if policy.retrieves else 0.0
        return fixed + self.hit_rate * per_hit

    def out_of_time(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stopped_early = True
        return self.stopped_early

    # -- one candidate
    # --------------------------------------------------------------------------------
    def evaluate(self, policy: Policy, base: RunOutput) -> RunOutput | None:
        """Run ``policy`` (threshold infinity) chunk by chunk; update the best setting.

        Returns the pass when it ran to the end (a template-only pass is the base of combined
        policies), else None."""
        reuse = self.reuse(policy)
        if not policy.retrieves:
            reuse = reuse[:1]  # one setting: no lookup, no threshold
        if not self.exhaustive and reuse.max() <= self.best.reuse:
            return None  # cannot beat the best even if it changed nothing
        self.tried += 1
        threshold = float("inf") if policy.retrieves else -1.0
        chunks, frontiers = self._chunks(policy)
        pending = self._pending(policy, base)
        out: RunOutput | None = None
        done: list[int] = []
        known = np.ones(len(reuse), bool)  # thresholds whose change count is final
        with self.s.cache.attach(self.s.model, policy, threshold=threshold) as att:
            for chunk, frontier in zip(chunks, frontiers, strict=True):
                if self.out_of_time():
                    return None
                seq_ids = self._seq_ids(chunk)
                out = self._run(att, seq_ids, out)
                self.passes += len(seq_ids) / max(1, len(self.seqs))
                done += chunk
                counts = self._counts(done, base, out, policy) + pending(done)
                if self.exhaustive:
                    continue
                # counts only grow as rows are added; below the frontier they are final
                known = self.thresholds[: len(reuse)] < frontier
                open_ = (reuse > self.best.reuse) & (counts <= self.c_max)
                if not np.any(open_):
                    return None  # every setting that would improve already broke the bound
                if not np.any(open_ & ~known):
                    break  # what is left cannot change any count that could still matter
        if out is None:
            return None
        feasible = np.flatnonzero((counts <= self.c_max) & known)
        if len(feasible):
            k = int(feasible[np.argmax(reuse[feasible])])
            if reuse[k] > self.best.reuse:
                t = float(self.thresholds[k]) if policy.retrieves else -1.0
                self.best = Setting(policy, t, float(reuse[k]), int(counts[k]), base, out)
        return out

    def _seq_ids(self, rows: list[int]) -> list[int]:
        return sorted({q for r in rows for q in self.plan.rows[r].seqs})

    def _run(self, att, seq_ids: list[int], into: RunOutput | None = None) -> RunOutput:
        """The sequences ``seq_ids`` with ``att`` attached, added to ``into`` (or a new output)."""
        model, tokenizer = self.s.model, self.s.tokenizer
        return run(
            model,
            tokenizer,
            self.plan,
            RunOptions(batch_size=self.batch_size, progress=False, seq_ids=seq_ids, into=into),
            tiers=Tiers(attached=att),
        )

    def _pending(self, policy: Policy, base: RunOutput):
        """Changes the rows not run yet add for sure: a row whose nearest sequence is farther
        than a threshold takes ``base`` there, which may itself differ from the exact answer
        (template heads under a combined policy). A function of the rows done, per threshold."""
        zero = np.zeros(len(self.thresholds) if policy.retrieves else 1, np.int64)
        if not policy.retrieves or base is self.exact:
            return lambda done: zero
        changed = [
            r
            for r in self.rows
            if row_prediction(self.plan.rows[r], base)
            != row_prediction(self.plan.rows[r], self.exact)
        ]
        near = {r: min(self.distances[q] for q in self.plan.rows[r].seqs) for r in changed}

        def pending(done: list[int]) -> np.ndarray:
            rest = np.array([near[r] for r in set(changed) - set(done)], dtype=np.float64)
            return (rest[None, :] > self.thresholds[:, None]).sum(1) if len(rest) else zero

        return pending

    def _chunks(self, policy: Policy) -> tuple[list[list[int]], list[float]]:
        """The rows in the order a pass takes them, and after each chunk the frontier: the
        smallest threshold whose change count the rows not yet run could still raise.

        Template heads touch every row: random chunks, no frontier until the end. Retrieval
        changes a row only at thresholds at or above its nearest sequence's distance, so rows go
        in that order and the counts below the frontier are final after each chunk: a pass stops
        as soon as the thresholds that matter are decided, and rows that never hit never run."""
        if not policy.retrieves or self.exhaustive:
            frontiers = [-np.inf] * (len(self.chunks) - 1) + [np.inf]
            return self.chunks, frontiers
        near = {r: min(self.distances[q] for q in self.plan.rows[r].seqs) for r in self.rows}
        order = sorted((r for r in self.rows if np.isfinite(near[r])), key=near.get)
        size = max(8, 2 * self.batch_size)
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        frontiers = [near[c[0]] for c in chunks[1:]] + [np.inf]
        return chunks, frontiers

    def _counts(
        self, rows: list[int], base: RunOutput, out: RunOutput, policy: Policy
    ) -> np.ndarray:
        if not policy.retrieves:  # the pass itself is the outcome
            return change_counts(
                self.plan, rows, self.exact, Mixture.alone(out), self.thresholds[:1]
            )
        mixture = Mixture(base, out, self.distances)
        return change_counts(self.plan, rows, self.exact, mixture, self.thresholds)

    def _changes(self, rows: list[int], out: RunOutput) -> int:
        """How many of ``rows`` a pass that is its own outcome changes."""
        return int(
            change_counts(self.plan, rows, self.exact, Mixture.alone(out), self.thresholds[:1])[0]
        )

    # -- the search
    # ------------------------------------------------------------------------------------
    def templates(self, ks: list[int]) -> tuple[int, RunOutput | None]:
        """The largest feasible template count among ``ks`` (bisection; all of them when
        exhaustive)."""
        outs: dict[int, RunOutput] = {}
        if self.exhaustive:
            for k in ks:
                got = self.evaluate(self.s.cache.policy(f"fixed:{k}"), self.exact)
                if got is not None and self._feasible_alone(got, k):
                    outs[k] = got
            best = max(outs, default=0)
            return best, outs.get(best)
        lo, hi = -1, len(ks)  # ks[lo] feasible (or none), ks[hi] infeasible (or past the end)
        while hi - lo > 1 and not self.out_of_time():
            mid = (lo + hi) // 2
            got = self.evaluate(self.s.cache.policy(f"fixed:{ks[mid]}"), self.exact)
            if got is not None and self._feasible_alone(got, ks[mid]):
                lo, outs[ks[mid]] = mid, got
            else:
                hi = mid
        return (ks[lo], outs[ks[lo]]) if lo >= 0 else (0, None)

    def _feasible_alone(self, out: RunOutput, k: int) -> bool:
        return self._changes(self.rows, out) <= self.c_max

    def policies(self, candidates: list[tuple[Policy, RunOutput]]) -> None:
        """Branch and bound over retrieval candidates, each with the pass its misses output, the
        most promising (largest reuse) first: combined policies usually lead, so a feasible one
        found early prunes the retrieval-alone candidates it already beats."""
        order = sorted(candidates, key=lambda c: -float(self.reuse(c[0]).max()))
        with Stage(len(order), "calibration candidates", self.progress) as bar:
            for policy, base in order:
                if self.out_of_time():
                    break
                self.evaluate(policy, base)
                bar.update()
                bar.set_postfix(
                    f"best reuse {self.best.reuse:.3f} ({self.best.policy.name}), "
                    f"{self.passes:.1f} passes"
                )

    def _certify(
        self, rows: list[int], seq_ids: list[int], base: RunOutput, within: Callable[[int], bool]
    ) -> tuple[np.ndarray, RunOutput]:
        """The best policy's change counts on ``rows`` per threshold, final up to the first
        threshold (from the lowest) that breaks the bound, and its pass.

        Only thresholds up to the chosen one are certified, so a sequence farther than it takes
        ``base`` at each of them and never runs; nearer ones run nearest first, in chunks, and
        the pass stops once the lowest threshold that breaks the bound is final (the rows not run
        yet only enter above their distance)."""
        best = self.best
        near = sorted(
            (q for q in seq_ids if self.distances[q] <= best.threshold),
            key=self.distances.__getitem__,
        )
        size = max(8, 2 * self.batch_size)
        out: RunOutput | None = None
        ran: set[int] = set()
        counts = np.zeros(len(self.thresholds), np.int64)
        with self.s.cache.attach(self.s.model, best.policy, threshold=float("inf")) as att:
            for i in range(0, max(1, len(near)), size):
                chunk = near[i : i + size]
                out = self._run(att, chunk, out)
                ran.update(chunk)
                dist = [d if q in ran else float("inf") for q, d in enumerate(self.distances)]
                counts = change_counts(
                    self.plan, rows, self.exact, Mixture(base, out, dist), self.thresholds
                )
                frontier = self.distances[near[i + size]] if i + size < len(near) else np.inf
                broken = [
                    k
                    for k, t in enumerate(self.thresholds)
                    if t <= best.threshold and not within(int(counts[k]))
                ]
                if broken and self.thresholds[broken[0]] < frontier:
                    break  # final: the certified thresholds end below it
        assert out is not None
        return counts, out

    # -- the bound, on rows that did not choose
    # -----------------------------------------------------------------
    def confirm(
        self, rows: list[int], base_policy: Policy | None
    ) -> tuple[Setting, RunOutput, int]:
        """Test the best setting on ``rows``, which took no part in choosing it, as a fixed
        sequence: its thresholds from the lowest up, each certified while its bound on ``rows``
        stays within max_loss, up to the chosen one; keep the last certified (none: reuse
        nothing). Returns that setting, its output on ``rows`` and its changed rows there.

        ``base_policy``: what a miss runs (the template heads of a combined policy), or None."""
        best = self.best
        if best.reuse <= 0:
            return self.none, self.exact, 0
        seq_ids = self._seq_ids(rows)

        def pass_of(policy: Policy, threshold: float, seqs: list[int]) -> RunOutput:
            with self.s.cache.attach(self.s.model, policy, threshold=threshold) as att:
                return self._run(att, seqs)

        def within(changes: int) -> bool:
            return binom_upper(changes, len(rows), self.conf) <= self.max_loss

        if not best.policy.retrieves:
            out = pass_of(best.policy, -1.0, seq_ids)
            changes = self._changes(rows, out)
            return (best, out, changes) if within(changes) else (self.none, self.exact, 0)
        base = self.exact if base_policy is None else pass_of(base_policy, -1.0, seq_ids)
        counts, out = self._certify(rows, seq_ids, base, within)
        reuse = self.reuse(best.policy)
        last = -1
        for k, threshold in enumerate(self.thresholds):
            if threshold > best.threshold or not within(int(counts[k])):
                break
            last = k
        if last < 0 or reuse[last] <= 0:
            return self.none, self.exact, 0
        t = float(self.thresholds[last])
        kept = Setting(best.policy, t, float(reuse[last]), int(counts[last]), base, out)
        return kept, mix(base, out, t), int(counts[last])
