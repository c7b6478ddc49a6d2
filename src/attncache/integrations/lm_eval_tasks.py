"""lm-eval task folders over local copies of the built-in data (offline: ``dataset_path: json``).

    folder = write_task("arc_easy", "runs/tasks", shots=5, limit=40)
    lm-eval run --include_path runs/tasks --tasks arc_easy_local ...

ARC-Easy is rendered as lm-eval's own ``arc_easy`` task does ("Question: ...\\nAnswer:", each
choice's text a continuation, metrics acc and acc_norm); the shots come from a separate split with
the ``first_n`` sampler (one prompt shared by every question) or, with ``sampler=None``, lm-eval's
default per-document sampler.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import data as data_mod
from ..errors import UserError

TASKS = ("arc_easy",)


def _arc_easy_docs() -> list[dict]:
    import ast

    docs = []
    for r in data_mod._arrow_rows("ai2_arc/ARC-Easy/validation"):
        ch = r["choices"] if isinstance(r["choices"], dict) else ast.literal_eval(r["choices"])
        if r["answerKey"] not in list(ch["label"]):
            continue
        docs.append(
            {
                "id": r.get("id", str(len(docs))),
                "question": r["question"].strip(),
                "choices": {"text": [t.strip() for t in ch["text"]], "label": list(ch["label"])},
                "answerKey": r["answerKey"],
            }
        )
    return docs


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid double-quoted YAML scalar


def write_task(
    name: str,
    folder: str | Path,
    shots: int = 5,
    limit: int | None = None,
    sampler: str | None = "first_n",
    pool: int = 25,
) -> str:
    """Write ``<name>_local`` (its YAML and JSONL splits) into ``folder``; returns the task name.
    The first ``pool`` documents are the few-shot split, the next ``limit`` the test split."""
    if name not in TASKS:
        raise UserError(f"no local lm-eval task for '{name}' (have: {', '.join(TASKS)})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = _arc_easy_docs()
    if pool < shots:
        raise UserError(f"the few-shot pool ({pool}) must hold at least {shots} documents")
    train, test = docs[:pool], docs[pool:]
    test = test[:limit] if limit is not None else test
    task = f"{name}_local"
    for split, rows in (("train", train), ("test", test)):
        with open(folder / f"{task}.{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    lines = [
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    train: {_yaml_str(str((folder / f'{task}.train.jsonl').resolve()))}",
        f"    test: {_yaml_str(str((folder / f'{task}.test.jsonl').resolve()))}",
        "training_split: train",
        "test_split: test",
        "fewshot_split: train",
        "output_type: multiple_choice",
        f"doc_to_text: {_yaml_str('Question: {{question}}' + chr(10) + 'Answer:')}",
        'doc_to_target: "{{choices.label.index(answerKey)}}"',
        'doc_to_choice: "{{choices.text}}"',
        f"num_fewshot: {shots}",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
    ]
    if sampler is not None:
        lines[-9:-9] = ["fewshot_config:", f"  sampler: {sampler}"]
    (folder / f"{task}.yaml").write_text("\n".join(lines) + "\n")
    return task
