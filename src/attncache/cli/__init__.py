"""Command line: a thin layer over the Python API (``attncache.workflows``, ``bench``, ``serve``,
``batch``).

Every error the user can fix is one line on stderr and exit status 2, argparse's own included.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError
from . import build_commands, db_commands, lm_eval_commands, run_commands, service_commands


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error
        self.exit(2, f"attncache: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="attncache", description="Reuse attention maps to speed up prefill-only inference."
    )
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    formatter = argparse.RawDescriptionHelpFormatter
    build_commands.register(sub, formatter)
    run_commands.register(sub, formatter)
    service_commands.register(sub, formatter)
    db_commands.register(sub)
    lm_eval_commands.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's own command line
        try:
            return lm_eval_commands.run_lm_eval(argv[1:])
        except UserError as e:
            print(f"attncache: error: {e}", file=sys.stderr)
            return 2
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return args.fn(args)
    except UserError as e:
        print(f"attncache: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attncache: interrupted", file=sys.stderr)
        return 130
