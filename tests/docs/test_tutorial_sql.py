"""docs/tutorials/first-job-sql.md, run top to bottom: every file saved, every command run, every
line the page shows seen, Ctrl-C pressed where the page presses it; and what the prose claims
(the T1 warning, /readyz before and after Ctrl-C, the job resuming where it stopped).
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

from tests.docs.tutorial import Command, Tutorial, matcher, resumed_at, stopped_at
from tests.support.servers import free_port


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status, answer.read().decode().strip()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().strip()


def test_your_first_job_on_the_sql_queue(tmp_path: Path) -> None:
    port = free_port()
    tutorial = Tutorial.prepare(
        "docs/tutorials/first-job-sql.md", tmp_path, WORKERKIT_HTTP_PORT=str(port)
    )
    probes: dict[str, tuple[int, str]] = {}

    def probe(line: str) -> None:
        for event in ("worker_ready:", "drain_started:"):
            if event in line and event not in probes:
                probes[event] = readyz(port)

    files: list[str] = []
    runs: list[list[str]] = []
    for kind, step in tutorial.steps():
        if isinstance(step, str):
            files.append(step)
            continue
        assert kind == "command"
        lines = tutorial.run(step, on_line=probe)
        if step.line == "workerkit check":
            # "Make greet's timeout 60 and run it again: ... T1 warns."
            tasks = tmp_path / "tasks.py"
            original = tasks.read_text()
            tasks.write_text(original.replace("@app.task(timeout=5)", "@app.task(timeout=60)"))
            warned = tutorial.run(Command("workerkit check"))
            assert any(re.match(r"\s*T1\s+WARN", line) for line in warned), warned
            tasks.write_text(original)
        if step.line == "workerkit run sql":
            runs.append(lines)

    assert files == ["tasks.py", "workerkit.toml"]
    assert len(runs) == 2
    assert probes["worker_ready:"] == (200, "ok")
    assert probes["drain_started:"][0] == 503
    # "starting at is where the first run stopped, not 0"
    assert stopped_at(runs[0]) > 3
    assert resumed_at(runs[1]) == [stopped_at(runs[0])]


def test_shown_lines_match_what_they_stand_for() -> None:
    assert matcher('... job_finished: ... outcome="released" ...').fullmatch(
        '2026-12-03T17:55:47Z INFO job_finished: job finished job_id="x" outcome="released" d=1'
    )
    assert not matcher('... outcome="released" ...').fullmatch('... outcome="succeeded" d=1')
    assert matcher("3f2b9c0d6e8a4f1b9a7c5d3e1f0a2b4c").fullmatch("0" * 32)
    assert not matcher("counted to 3").fullmatch("counted to 30")
