"""An opened DB with its model loaded and checked: what eval, bench, calibrate and serve start
from."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch

from .. import data as data_mod
from .. import models
from ..cache import AttnCache
from ..db.tier_store import TierFolder
from ..errors import UserError
from ..tasks import Plan, plan_rows, require_rows
from ..tiers import PrefixTier, kept_name, supports_prefix


def input_limit(model, tokenizer, cap: int | None = None) -> int | None:
    """The longest input the model (and tokenizer) take, or ``cap`` if that is smaller."""
    n = getattr(model.config, "max_position_embeddings", None)
    if cap is not None:
        n = min(n, cap) if n else cap
    t = getattr(tokenizer, "model_max_length", None)
    if t is not None and t < 10**6:
        n = min(n, t) if n else t
    return n


def warn_skipped(msgs: list[str], quiet: bool) -> None:
    if msgs and not quiet:
        for m in msgs[:5]:
            print(f"skipped {m}", file=sys.stderr)
        if len(msgs) > 5:
            print(f"... and {len(msgs) - 5} more skipped rows", file=sys.stderr)


def warn_if_emulated(model) -> None:
    """A half precision on a CPU without its units (AVX2 only: no bf16) runs many times slower
    than float32, whoever asked for it (``--dtype``, or a bfloat16 checkpoint's ``dtype=auto``
    under lm-eval): one line says so."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype not in (torch.bfloat16, torch.float16):
        return
    from ..tasks import precisions  # the probe the cheap pass uses, timed once per process

    speed = precisions.native_speedup(p.dtype, "cpu")
    if speed < 1.0:
        name = models.dtype_name(p.dtype)
        print(
            f"attncache: warning: {name} is emulated on this CPU (its matmuls run at {speed:.2f}x "
            "float32's): float32 runs this model faster here",
            file=sys.stderr,
        )


def quantize_int8(model):
    """torch's CPU dynamic int8 quantization of every Linear (weights int8, activations on the fly).

    The maps were recorded on the fp32 model; replay only needs ``v_proj``/``o_proj`` to be
    callable, and computes the Q/K rows of partially reused layers through the quantized linears
    whole."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    models.same_identity(
        quantized, model
    )  # the identity check refers to the weights the maps came from
    return quantized


@dataclass
class SessionOptions:
    """How ``Session.open`` loads the model and opens the DB."""

    device: str = "cpu"
    dtype: str = "float32"
    quantize: str | None = None  # "int8": torch's dynamic int8 linears (CPU, float32 only)
    max_tokens: int | None = None  # rows with a longer input are skipped (reported)
    max_bytes: int | None = None  # the DB's byte cap (None: as stored)
    eviction: str | None = None  # the DB's eviction rule (None: as stored)


@dataclass
class CalibrationData:
    """What ``calibrate``, ``templates`` and ``sweep`` run on: a DB, DATA's rows (the first
    ``limit``), the model that opens the DB (``model_name``: the DB's own by default) and how it
    loads."""

    db: str
    data: str
    limit: int | None = None
    model_name: str | None = None
    session: SessionOptions = field(default_factory=SessionOptions)


@dataclass
class Session:
    cache: AttnCache | None  # None: no map DB, the exact tiers only
    model: object
    tokenizer: object
    max_tokens: int | None = None  # rows with a longer input are skipped (reported)
    quantized: bool = False

    @classmethod
    def open(
        cls, db: str | None, model_name: str | None = None, options: SessionOptions | None = None
    ) -> Session:
        """Open ``db`` and load its model (or ``model_name``, which must be the same weights) as
        ``options`` say (device, dtype, int8, the DB's byte cap and eviction, the token limit).
        ``db`` None: ``model_name`` alone, served by the exact tiers (no map reuse)."""
        o = options or SessionOptions()
        quantize, device, dtype = o.quantize, o.device, o.dtype
        if quantize is not None and quantize != "int8":
            raise UserError(f"--quantize: only 'int8' is supported, got '{quantize}'")
        if quantize and (dtype != "float32" or models.resolve_device(device) != "cpu"):
            raise UserError(
                "--quantize int8 is torch's CPU dynamic quantization of a float32 model; "
                "it cannot be combined with --dtype or a GPU --device"
            )
        if db is None:
            if model_name is None:
                raise UserError(
                    "which model? pass --db DB (a map cache) or --model MODEL (exact tiers)"
                )
            cache = None
            model, tok = models.load(model_name, dtype=dtype, device=device)
        else:
            cache = AttnCache.open(db, max_bytes=o.max_bytes, eviction=o.eviction)
            name = model_name or cache.manifest["model"]["name"]
            model, tok = models.load(name, dtype=dtype, device=device)
            cache.check_model(model)  # on the weights the DB was built with
            cache.check_tokenizer(tok)
        if quantize == "int8":
            model = quantize_int8(model)
        warn_if_emulated(model)
        return cls(cache, model, tok, o.max_tokens, quantized=quantize == "int8")

    @property
    def device(self) -> str:
        return models.describe(self.model)[0]

    @property
    def dtype(self) -> str:
        return "int8-dynamic" if self.quantized else models.describe(self.model)[1]

    @property
    def causal(self) -> bool:
        return models.model_kind(self.model.config) == "decoder"

    @property
    def max_len(self) -> int | None:
        return input_limit(self.model, self.tokenizer, self.max_tokens)

    def prefix_tier(self, max_bytes: int | None) -> PrefixTier | None:
        """A fresh exact prefix tier, for decoders whose layers attend to all earlier keys or a
        sliding window of them (``tiers.supports_prefix``)."""
        if max_bytes is None or not self.causal or not supports_prefix(self.model):
            return None
        return PrefixTier(self.model, max_bytes)

    def tier_folder(self, prefix_dir: str | None, max_bytes: int | None) -> TierFolder | None:
        """The folder that keeps the exact tiers between runs (``--prefix-dir``), checked for
        this model; None without one. It holds the prefix tier's K/V, so it needs that tier."""
        if prefix_dir is None:
            return None
        if self.prefix_tier(max_bytes) is None:
            raise UserError(
                "--prefix-dir keeps the prefix tier's K/V: it needs a decoder whose layers attend "
                "to all earlier keys or a sliding window of them, and the tier on "
                "(no --no-prefix-cache)"
            )
        return TierFolder(prefix_dir, models.fingerprint(self.model, self.tokenizer))

    def kept_prefix(self, folder: TierFolder | None) -> dict | None:
        """The prefix K/V ``folder`` keeps for this model's numerics (dtype, device, int8), read
        once for every pass; None if it keeps none (or only other numerics')."""
        if folder is None:
            return None
        return folder.read(kept_name(models.numerics(self.model)))

    def plan(
        self, data: str, limit: int | None = None, strict: bool = False, quiet: bool = False
    ) -> Plan:
        ds = data_mod.load(data, encoder=not self.causal, limit=limit, strict=strict)
        plan = plan_rows(ds.rows, self.tokenizer, self.causal, self.max_len)
        plan.skipped = ds.skipped + plan.skipped  # counted as one: the reader's and the plan's
        warn_skipped(plan.skipped, quiet)
        require_rows(plan)
        return plan
