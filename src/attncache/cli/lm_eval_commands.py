"""lm-evaluation-harness from the command line: its own CLI with the ``attncache`` backend
registered, and the local (offline) copies of its tasks over the built-in data."""

from __future__ import annotations

import sys

from ..errors import UserError
from .options import NON_NEGATIVE, POSITIVE


def run_lm_eval(args: list[str]) -> int:
    """lm-eval's CLI, with ``--model attncache`` registered (lm-eval 0.4 loads no plugins)."""
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..integrations import lm_eval as _backend  # noqa: F401 - registers the backend
    except ImportError:
        raise UserError(
            "the lm-eval backend needs lm-evaluation-harness: pip install 'attncache[lm-eval]'"
        ) from None
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as e:  # lm-eval's CLI exits on its own errors and after --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        sys.argv = saved
    return 0


def run_tasks(a) -> int:
    from ..integrations.lm_eval_tasks import TaskOptions, write_task

    sampler = None if a.sampler == "default" else a.sampler
    options = TaskOptions(a.shots, a.limit, sampler, a.pool, a.subjects)
    names = write_task(a.name, a.folder, options)
    print("\n".join(names))
    tasks = "mmlu_local" if a.name == "mmlu" else names[0]
    print(f"lm-eval run --include_path {a.folder} --tasks {tasks} ...", file=sys.stderr)
    return 0


def register(sub) -> None:
    sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the 'attncache' backend registered: every further "
        "argument is lm-eval's (e.g. attncache lm-eval run --model attncache --model_args "
        "pretrained=smollm2-135m --tasks TASK)",
    )
    from ..integrations.lm_eval_tasks import TASKS

    sp = sub.add_parser(
        "lm-eval-task",
        help="write an lm-eval task (YAML and JSONL) over the built-in offline data into a "
        "folder for --include_path; prints the task names",
    )
    sp.add_argument("name", choices=TASKS)
    sp.add_argument("folder")
    sp.add_argument("--shots", type=NON_NEGATIVE, default=5)
    sp.add_argument("--limit", type=POSITIVE, help="test documents (per subject)")
    sp.add_argument(
        "--sampler",
        choices=["first_n", "default"],
        default="first_n",
        help="first_n: one prompt for every question; default: lm-eval's, each its own shots",
    )
    sp.add_argument("--pool", type=POSITIVE, default=25, help="few-shot documents")
    sp.add_argument("--subjects", type=POSITIVE, help="MMLU: the first N subjects")
    sp.set_defaults(fn=run_tasks)
