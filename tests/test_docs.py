"""Every test docs/guarantees.md names exists: a promise whose test was renamed or removed would
otherwise read as covered."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
REF = re.compile(r"(test_\w+\.py)?(?:::(test_\w+))?")


def named_tests(text: str) -> list[tuple[str, str | None]]:
    """``file.py::test`` and ``::test`` (of the file named last) and bare ``file.py``, in order."""
    out, current = [], None
    for m in REF.finditer(text):
        file, test = m.group(1), m.group(2)
        if file:
            current = file
        if file or test:
            out.append((current, test))
    return out


def test_every_test_the_guarantees_name_exists():
    refs = named_tests((ROOT / "docs" / "guarantees.md").read_text())
    assert len(refs) > 50  # the parser still finds the references

    def exists(file: str | None, test: str | None) -> bool:
        path = ROOT / "tests" / file if file else None
        if path is None or not path.exists():
            return False
        return not test or bool(re.search(rf"^(async )?def {test}\(", path.read_text(), re.M))

    missing = [f"{file}::{test}" for file, test in refs if not exists(file, test)]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"


def test_the_parser_carries_the_file_to_bare_test_names():
    assert named_tests("`a_test.py` `test_a.py::test_x`, `::test_y`; `test_b.py`") == [
        ("test_a.py", "test_x"),
        ("test_a.py", "test_y"),
        ("test_b.py", None),
    ]
