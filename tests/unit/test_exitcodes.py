"""Exit codes: named once, documented once, and the two agree."""

from __future__ import annotations

import re
from pathlib import Path

from workerkit import exitcodes

DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "exit-codes.md"


def test_every_exit_code_is_documented_with_its_number() -> None:
    rows = {
        name: int(code)
        for code, name in re.findall(r"^\| (\d+) \| `(\w+)` \|", DOC.read_text(), re.M)
    }
    declared = {name: code for name, code, _ in exitcodes.DESCRIPTIONS}
    assert rows == declared
    for name, code in declared.items():
        assert getattr(exitcodes, name) == code
        assert name in exitcodes.__all__


def test_describe_names_the_run_meaning() -> None:
    assert exitcodes.describe(exitcodes.OK) == "stopped cleanly; nothing was lost"
    assert "unexpected" in exitcodes.describe(1)
    assert "check" in exitcodes.describe(1, run=False)
    assert exitcodes.describe(99) == "exit code 99"
