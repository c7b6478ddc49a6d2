"""``lm-eval --model attncache``: lm-evaluation-harness's HF backend with its log-likelihoods run
through attncache's exact tiers.

The backend is ``HFLM`` with one method replaced: ``_loglikelihood_tokens``. Everything lm-eval
decides stays lm-eval's: tokenization (``TemplateLM`` encodes context + continuation whole and
splits at the context's length), left truncation to ``max_length``, rolling windows
(``loglikelihood_rolling`` calls the method below per window), ``generate_until`` (the plain
model's ``generate``). What changes is how the forwards run: every request of a call becomes one
sequence of a plan, and ``tasks.run`` computes shared prefixes once (a few-shot header, a context
and its choices in one packed row) in forwards sized like a plain batch. Exact: the same numbers
as ``--model hf`` to float32 rounding.

Model args as HFLM names them where they overlap (``pretrained`` takes every name attncache
takes: ``smollm2-135m``, an HF folder, a ``.gguf``; ``batch_size``, ``device``, ``dtype``, whose
default ``auto`` is the checkpoint's own dtype, as HFLM's), plus
``db``/``policy`` (approximate map reuse, only when asked), ``prefix_bytes``, ``prefix_dir`` (the
prefix tier's K/V kept between runs: a rerun's few-shot headers are not recomputed) and ``memo``
(answers kept in the DB or ``prefix_dir``: a rerun of the same requests runs no forward).
"""

from __future__ import annotations

import logging

from .. import models
from ..errors import UserError, keep_or_warn
from ..tasks import Plan, Query, RowPlan, RunOptions, Tiers, run
from ..tiers import DEFAULT_PREFIX_BYTES

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - the optional extra
    raise ImportError(
        "the lm-eval backend needs lm-evaluation-harness: pip install 'attncache[lm-eval]'"
    ) from e

log = logging.getLogger("attncache.lm_eval")

Request = tuple[tuple[str, str] | None, list[int], list[int]]


class ModelArgError(UserError, ValueError):
    """A bad ``--model_args`` value: one line from ``attncache lm-eval``, a ``ValueError`` to
    code that builds the backend itself."""


def plan_requests(requests: list[Request], max_length: int) -> Plan:
    """One sequence per request, as HFLM forms it: (context + continuation), left-truncated to
    ``max_length + 1`` tokens, without its last token; one query per continuation token (the
    logits at position t predict token t + 1). Identical sequences are planned once."""
    seqs: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    rows: list[RowPlan] = []
    for n, (_, context, continuation) in enumerate(requests):
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(
                f"request {n}: a context and a continuation of 1..{max_length} tokens are needed"
            )
        ids = (list(context) + list(continuation))[-(max_length + 1) :][:-1]
        key = tuple(ids)
        if key not in index:
            index[key] = len(seqs)
            seqs.append(ids)
        s = index[key]
        size = len(continuation)
        queries = [Query(s, size - j, int(tok)) for j, tok in enumerate(continuation)]
        rows.append(RowPlan("choiceN", [s], [queries], [1.0], index=n))
    return Plan(seqs, rows, [], True)


def _device_of(device: str | None) -> str:
    """lm-eval's device strings ('cuda:0', its default, even without a GPU) as attncache's: like
    HFLM, without a GPU it runs on the CPU."""
    import torch

    name = (device or "cpu").split(":")[0]
    if name == "cuda" and not torch.cuda.is_available():
        log.warning("attncache: no CUDA device visible; running on the CPU")
        return "cpu"
    return name


@register_model("attncache")
class AttnCacheLM(HFLM):
    def __init__(
        self,
        pretrained: str = models.DEFAULT_MODEL,
        batch_size: int | str = 8,
        device: str = "cpu",
        dtype: str = "auto",
        db: str | None = None,
        policy: str | None = None,
        prefix_bytes: int | str | None = DEFAULT_PREFIX_BYTES,
        prefix_dir: str | None = None,
        memo: bool | str = True,
        **kwargs,
    ):
        from ..tiers.memo import ResultMemo
        from ..workflows import Session, SessionOptions

        device = _device_of(device)
        # "auto", HFLM's default: the checkpoint's own dtype, so both backends run the same one
        dtype = models.stored_dtype(pretrained) if dtype in (None, "auto") else str(dtype)
        if policy is not None and db is None:
            raise ModelArgError("policy= reuses approximate maps: it needs db=")
        cap = _bytes(prefix_bytes, "prefix_bytes")
        keep_answers = _flag(memo, "memo")  # all checked before the model loads
        batch = _batch_size(batch_size)
        self.session = Session.open(db, pretrained, SessionOptions(device=device, dtype=dtype))
        super().__init__(
            pretrained=self.session.model,
            tokenizer=self.session.tokenizer,
            batch_size=batch,
            **kwargs,
        )
        self.prefix = self.session.prefix_tier(cap)
        self.folder = self.session.tier_folder(prefix_dir, cap)
        kept = self.session.kept_prefix(self.folder)
        if self.prefix is not None and kept is not None:
            self.prefix.restore(kept)
        self.memo: ResultMemo | None = None  # only where answers can be kept: a DB or prefix_dir
        if keep_answers and (db is not None or self.folder is not None):
            cache = self.session.cache
            self.memo = (
                ResultMemo.load(cache.db)
                if cache is not None
                else ResultMemo.load_from(self.folder)
            )
        self.att = None
        if db is not None and policy is not None:
            self.att = self.session.cache.attach(self.session.model, policy).__enter__()
            log.warning(
                "attncache: approximate map reuse (policy %s); the DB's bound: %s",
                policy,
                self.session.cache.info().default_reuse,
            )
        log.info(
            "attncache: log-likelihoods through the exact tiers (prefix tier %s, memo %s); "
            "generate_until runs the plain model's generate",
            "on" if self.prefix is not None else "off",
            f"{len(self.memo)} answers" if self.memo is not None else "off",
        )

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if not requests:
            return []
        plan = plan_requests(requests, self.max_length)
        opts = RunOptions(
            batch_size=int(self.batch_size),
            progress=not disable_tqdm,
            desc="attncache loglikelihood",
            greedy=True,
            keep_prefixes=self.folder is not None,
        )
        tiers = Tiers(attached=self.att, prefix=self.prefix, memo=self.memo)
        out = run(self.model, self.tokenizer, plan, opts, tiers)
        self._keep()
        answers: list[tuple[float, bool]] = []
        for (request, _, _), row in zip(requests, plan.rows, strict=True):
            queries = row.queries[0]
            logprob = sum(out.logprobs[(q.seq, q.from_end, q.token)] for q in queries)
            greedy = all(out.greedy[(q.seq, q.from_end)] == q.token for q in queries)
            answer = (float(logprob), bool(greedy))
            if request is not None:  # rolling windows come without their strings
                self.cache_hook.add_partial("loglikelihood", request, answer)
            answers.append(answer)
        return answers

    def _keep(self) -> None:
        """Save what later runs reuse: the memo's new answers, the kept prompts' K/V."""
        cache, memo, folder, prefix = self.session.cache, self.memo, self.folder, self.prefix
        if memo is not None and memo.dirty:
            if cache is not None:
                try:
                    if not memo.save(cache.db):
                        log.warning("attncache: the DB is locked by a writer; new answers not kept")
                except UserError as e:  # a full disk: this call's answers are computed already
                    log.warning("attncache: the new answers not kept: %s", e)
            elif folder is not None:
                keep_or_warn("the new answers", lambda: memo.save_to(folder))
        if folder is not None and prefix is not None:
            keep_or_warn("the prefix K/V", lambda: prefix.save(folder))


def _flag(value: bool | str, name: str) -> bool:
    """A model arg from lm-eval's ``--model_args`` string ('true', 'False', '0') as a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", "none"):
        return False
    raise ModelArgError(f"{name}= takes true or false, not {value!r}")


def _batch_size(value: int | str) -> int:
    """``--batch_size``: 'auto' (or 'auto:N') is 8: the tiers size forwards by tokens, so
    lm-eval's probing for the largest batch that fits does not apply."""
    text = str(value).strip()
    if text.startswith("auto"):
        return 8
    if not text.isdigit() or int(text) < 1:
        raise ModelArgError(f"batch_size takes a positive number or auto, not {value!r}")
    return int(text)


def _bytes(value: int | str | None, name: str) -> int | None:
    """A byte count from ``--model_args`` (0 or none: off)."""
    if value is None or str(value).strip().lower() in ("none", "0", "off"):
        return None
    try:
        count = int(str(value).strip())
    except ValueError:
        count = -1
    if count < 0:
        raise ModelArgError(f"{name}= takes a number of bytes (0 or none: off), not {value!r}")
    return count
