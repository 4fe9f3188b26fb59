"""docs/reliability.md: every row of its fault table names tests that exist.

A citation is `tests/FILE.py` (the whole file: it must hold at least one test) or
`tests/FILE.py::test_name` (a test function of that file; a `[param]` suffix names one case
of it). Files are read with `ast`, never imported, so a citation of a file that does not
exist, or of a test that was renamed, fails here and names the row.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
CITATION = re.compile(r"`(tests/[^`\s]*)`")
TEST_ID = re.compile(
    r"^(?P<file>tests/[\w/]+\.py)(?:::(?P<cls>Test\w+)::(?P<meth>test\w*)|::(?P<func>test\w*))?"
    r"(?:\[[^\]]+\])?$"
)
COLUMNS = ["Fault", "Probes", "Log", "Exit", "Nothing lost", "Test"]
# The faults issue 16 asks the table to cover: (what the row is about, words its fault names).
REQUIRED = [
    ("idle connection flood", ("idle",)),
    ("slowloris", ("slowloris",)),
    ("garbage on the probe port", ("garbage bytes",)),
    ("oversized heads", ("oversized",)),
    ("upstream 5xx", ("5xx",)),
    ("garbage during the warm-up", ("garbage answers",)),
    ("hangs during the warm-up", ("stops answering",)),
    ("engine dies while loading", ("dies while loading",)),
    ("engine dies during the warm-up", ("dies during the warm-up",)),
    ("engine dies after Ready", ("after ready",)),
    ("warm-up worker killed", ("worker is killed",)),
    ("upstream wedged after Ready", ("wedged after ready",)),
    ("read-only cache volume", ("read-only cache",)),
    ("full cache volume", ("full cache",)),
    ("second SIGTERM", ("second sigterm",)),
    ("SIGINT / Ctrl-C", ("sigint", "ctrl-c")),
    ("SIGKILL of warmgate", ("sigkill of warmgate",)),
    ("API key", ("api key",)),
]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_rows() -> list[dict[str, str]]:
    """The fault table's rows, as {column: cell}."""
    lines = DOC.read_text().splitlines()
    header = next(
        (i for i, line in enumerate(lines) if line.startswith("|") and cells(line) == COLUMNS),
        None,
    )
    assert header is not None, f"{DOC.name}: no table with the columns {COLUMNS}"
    rows = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        row = cells(line)
        assert len(row) == len(COLUMNS), f"{len(row)} cells, not {len(COLUMNS)}: {line[:120]}"
        rows.append(dict(zip(COLUMNS, row, strict=True)))
    return rows


def names_of_tests(path: Path) -> set[str]:
    """Test names in a file: `test_x` at module level, `TestY::test_z` in a class."""
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    found = {n.name for n in tree.body if isinstance(n, functions) and n.name.startswith("test")}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            found |= {
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, functions) and item.name.startswith("test")
            }
    return found


def problem(citation: str) -> str | None:
    """Why a citation does not name an existing test, or None when it does."""
    match = TEST_ID.match(citation)
    if match is None:
        return "is not tests/FILE.py or tests/FILE.py::test_name"
    path = ROOT / match["file"]
    if not path.is_file():
        return "names a file that does not exist"
    names = names_of_tests(path)
    if not names:
        return "names a file with no test in it"
    wanted = match["func"] or (match["cls"] and f"{match['cls']}::{match['meth']}")
    if wanted and wanted not in names:
        return f"names a test that {match['file']} does not hold"
    return None


def test_the_table_has_the_columns_and_a_row_for_every_fault_of_issue_16() -> None:
    rows = table_rows()
    faults = [row["Fault"].lower() for row in rows]
    missing = [what for what, words in REQUIRED if not any(w in f for f in faults for w in words)]
    assert not missing, f"no row for: {missing}"
    for row in rows:
        empty = [column for column in COLUMNS if not row[column]]
        assert not empty, f"row {row['Fault'][:60]!r} leaves {empty} empty"


def test_every_row_names_tests_that_exist() -> None:
    failures = []
    for row in table_rows():
        citations = CITATION.findall(row["Test"])
        if not citations:
            failures.append(f"{row['Fault'][:60]!r} names no test")
        for citation in citations:
            why = problem(citation)
            if why is not None:
                failures.append(f"{row['Fault'][:60]!r}: `{citation}` {why}")
    assert not failures, "\n".join(failures)


def test_every_test_of_test_faults_is_a_row_of_the_table() -> None:
    cited = {c for row in table_rows() for c in CITATION.findall(row["Test"])}
    named = {
        c.split("::", 1)[1].split("[")[0] for c in cited if c.startswith("tests/test_faults.py::")
    }
    uncited = names_of_tests(ROOT / "tests" / "test_faults.py") - named
    assert not uncited, f"tests/test_faults.py holds tests no row cites: {sorted(uncited)}"


def test_the_checker_refuses_what_does_not_exist(tmp_path: Path) -> None:
    # The checks above pass only if these fail: bad form, missing file, missing test.
    assert problem("tests/test_faults.py::test_no_such_fault") is not None
    assert problem("tests/test_no_such_file.py") is not None
    assert problem("tests/test_no_such_file.py::test_x") is not None
    assert problem("test_faults.py") is not None
    assert problem("tests/wgutil.py") == "names a file with no test in it"
    assert problem("tests/test_faults.py::test_api_key_is_used_and_never_echoed[env]") is None
