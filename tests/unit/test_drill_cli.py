"""The drill's flags: rates, durations, mixes, and their errors naming the flag and the fix."""

from __future__ import annotations

import io

import pytest

from workerkit.drill.options import ProgressPrinter, parse_duration, parse_mix, parse_rate
from workerkit.drill.run import DrillProgress, assign_kinds
from workerkit.errors import ConfigurationError


def test_rates_and_durations() -> None:
    assert parse_rate("50/s") == 50
    assert parse_rate("50") == 50
    assert parse_rate("600/m") == 10
    assert parse_duration("120s", "--duration") == 120
    assert parse_duration("2m", "--duration") == 120
    assert parse_duration("500ms", "--duration") == 0.5
    assert parse_duration("7", "--duration") == 7


@pytest.mark.parametrize("raw", ["0/s", "-1", "fast", "5/week", "inf"])
def test_bad_rates_name_the_flag(raw: str) -> None:
    with pytest.raises(ConfigurationError, match=r"--rate: .* such as 50/s"):
        parse_rate(raw)


def test_bad_duration_names_the_flag() -> None:
    with pytest.raises(ConfigurationError, match=r"--settle-timeout: '2 days' is not a duration"):
        parse_duration("2 days", "--settle-timeout")


def test_mix() -> None:
    assert parse_mix("short=90,long=5,flaky=5") == {"short": 90, "long": 5, "flaky": 5}
    with pytest.raises(ConfigurationError, match="KIND=WEIGHT with KIND one of short, long"):
        parse_mix("slow=5")
    with pytest.raises(ConfigurationError, match="at least one kind"):
        parse_mix("short=0")


def test_kinds_follow_the_mix_evenly() -> None:
    kinds = assign_kinds({"short": 90, "long": 5, "flaky": 5}, 200)
    assert kinds.count("short") == 180
    assert kinds.count("long") == 10
    assert kinds.count("flaky") == 10
    # spread out, not bunched at the end
    assert "long" in kinds[:25]
    assert "flaky" in kinds[:25]


def test_progress_is_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, every=5.0)
    for t in (0.0, 1.0, 2.0, 5.5):
        printer(DrillProgress("enqueueing", t, int(t * 10), 0, 0, 0, 100))
    printer(DrillProgress("done", 9.0, 100, 100, 100, 0, 100))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "\r" not in out.getvalue()
    assert lines[-1].startswith("done")
    assert "completed 100" in lines[-1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal() -> None:
    out = Terminal()
    printer = ProgressPrinter(out)
    printer(DrillProgress("enqueueing", 0.5, 5, 1, 1, 0, 100))
    printer(DrillProgress("enqueueing", 1.5, 15, 10, 9, 0, 100))
    printer(DrillProgress("done", 9.0, 100, 100, 100, 0, 100))
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 3
    assert text.count("\n") == 1
    assert text.endswith("twice 0\n")


def test_a_drill_id_with_records_already_is_refused() -> None:
    from workerkit.drill.records import CanaryRun
    from workerkit.drill.run import DrillSpec, run_drill
    from workerkit.settings import Settings

    class Driver:
        default_queues = ("default",)

        class records:  # noqa: N801 - a record store double with one old run
            @staticmethod
            def runs(drill_id: str) -> list[CanaryRun]:
                return [CanaryRun(drill_id, "r", 0, "short", 1, "h", 1, 0.0, 0.0)]

        def enqueue(self, *args: object) -> None:
            raise AssertionError("nothing may be enqueued")

        def close(self) -> None:
            pass

    spec = DrillSpec(engine="sql", settings=Settings(), drill_id="used")
    with pytest.raises(ConfigurationError, match="--drill-id used: that drill has records"):
        run_drill(spec, driver=Driver())  # type: ignore[arg-type]
