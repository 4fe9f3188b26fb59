"""The exit table: one source for every reason and code, and the README's table agrees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from warmgate.errors import EXIT_REASONS, Ending, Exit, child_ending, ending

README = Path(__file__).parent.parent / "README.md"


def readme_exit_table() -> list[tuple[str, str, str]]:
    """(code, reason, meaning) of each row of the README's "Exit codes" table."""
    section = README.read_text().split("### Exit codes", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].split("|")[1:4] == [" code ", " reason ", " meaning "], rows[0]
    found = []
    for row in rows[2:]:  # after the header and its |---| line
        code, reason, meaning = (cell.strip() for cell in row.strip("|").split("|"))
        found.append((code, reason.strip("`"), meaning))
    return found


def test_the_readme_table_is_the_exit_table() -> None:
    table = [(r.code_text, r.name, r.meaning) for r in EXIT_REASONS.values()]
    assert readme_exit_table() == table


def test_fixed_codes_come_from_exit() -> None:
    fixed = {r.name: r.code for r in EXIT_REASONS.values() if r.code is not None}
    assert fixed["upstream_never_healthy"] == Exit.UPSTREAM_NEVER_HEALTHY == 69
    assert fixed["warmup_failed"] == Exit.WARMUP_FAILED == 70
    assert all(isinstance(code, Exit) for code in fixed.values())
    assert all(re.fullmatch(r"[a-z_]+", name) for name in EXIT_REASONS)


def test_ending_takes_the_code_from_the_table() -> None:
    assert ending("probe_port_unavailable") == Ending("probe_port_unavailable", 71)
    assert ending("usage", 2) == Ending("usage", 2)
    assert ending("error", 1) == Ending("error", 1)
    with pytest.raises(ValueError, match="needs its code"):
        ending("child_exited")
    with pytest.raises(ValueError, match="exits 69"):
        ending("upstream_never_healthy", 0)
    with pytest.raises(KeyError):
        ending("no_such_reason")


def test_the_child_ending_says_whether_a_signal_killed_it() -> None:
    assert child_ending(3, None) == Ending("child_exited", 3)
    assert child_ending(137, None) == Ending("child_exited", 137)  # exit(137) is no signal
    assert child_ending(143, 15) == Ending("child_killed", 143)
