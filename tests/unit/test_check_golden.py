"""``workerkit check`` prints exactly what it printed before: text and JSON, byte for byte.

Each case is a ``workerkit check`` invocation from docs/, README.md or examples/, or a broken
budget that fires the rules of one family. Its stdout, stderr and exit code are recorded under
tests/unit/golden/check/. After a deliberate change of the output, regenerate them with
``GOLDEN_UPDATE=1 pytest tests/unit/test_check_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from workerkit.cli import main
from workerkit.settings import ENV_PREFIX

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden" / "check"
UPDATE = os.environ.get("GOLDEN_UPDATE") == "1"
APPS = "tests.apps.golden_apps"


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: Run in a fresh ``python`` process: Celery registers tasks and configures apps in place,
    #: process-wide, so a second in-process import of a Celery app would not be what users see.
    fresh_process: bool = False


def _config(path: str) -> dict[str, str]:
    return {f"{ENV_PREFIX}CONFIG": str(ROOT / path)}


CASES = (
    # documented: docs/concepts/timing-budget.md, README.md, docs/engines/*.md, examples/
    Case("defaults"),
    Case("docs_with_tasks", ("--app", f"{APPS}:docs_app")),
    Case(
        "docs_broken_celery",
        env={
            f"{ENV_PREFIX}ENGINE": "celery",
            f"{ENV_PREFIX}JOB_TIMEOUT": "60",
            f"{ENV_PREFIX}VISIBILITY_TIMEOUT": "30",
        },
    ),
    Case(
        "quickstart",
        ("--app", "examples.quickstart.app:app"),
        _config("examples/quickstart/workerkit.toml"),
    ),
    Case(
        "backfill",
        ("--app", "examples.backfill.app:app"),
        {f"{ENV_PREFIX}DATABASE_URL": "postgresql+psycopg://postgres:pw@127.0.0.1:5432/postgres"},
    ),
    Case("rq_app", ("--engine", "rq", "--app", "examples.rq_app.jobs:app")),
    Case("rq_app_config", env=_config("examples/rq_app/workerkit.toml")),
    Case(
        "celery_app",
        ("--engine", "celery", "--app", "examples.celery_app.tasks:app"),
        fresh_process=True,
    ),
    # broken budgets, by rule family
    Case("g_no_drain_window", ("--grace-period", "10", "--prestop-delay", "10")),
    Case("g_prestop_past_grace", ("--grace-period", "10", "--prestop-delay", "30")),
    Case("g_prestop_timeline", ("--grace-period", "60", "--prestop-delay", "10")),
    Case("g_short_drain_f", ("--grace-period", "8", "--checkpoint-interval", "5")),
    Case("g_tiny_values", ("--grace-period", "0.01", "--release-margin", "0.001")),
    Case("t_strict", ("--app", f"{APPS}:docs_app", "--strict")),
    Case("f_rare_checkpoints", ("--checkpoint-interval", "20")),
    Case("h_sql", ("--heartbeat-interval", "20", "--visibility-timeout", "30")),
    Case("h_rq_late", ("--engine", "rq", "--heartbeat-interval", "12")),
    Case("h_tiny_lease", ("--heartbeat-interval", "1", "--visibility-timeout", "1")),
    Case("v_countdown", ("--engine", "celery", "--max-countdown", "4000")),
    Case("v_too_long", ("--engine", "celery", "--visibility-timeout", "100000")),
    Case("v_tight_lease", ("--engine", "celery", "--visibility-timeout", "200")),
    Case(
        "i_short_keys",
        ("--idempotency-in-progress-expiry", "100", "--idempotency-retention", "200"),
    ),
    Case(
        "i_celery_no_room",
        ("--engine", "celery", "--visibility-timeout", "310"),
        {f"{ENV_PREFIX}IDEMPOTENCY_IN_PROGRESS_EXPIRY": "400"},
    ),
    Case(
        "l_chain",
        (
            "--scheduler-lease-duration",
            "10",
            "--scheduler-renew-deadline",
            "10",
            "--scheduler-retry-period",
            "9",
        ),
    ),
    Case("l_short_deadline", ("--scheduler-renew-deadline", "1", "--scheduler-retry-period", "1")),
    Case("l_standby_late", ("--scheduler-standby-delay", "3", "--scheduler-misfire-grace", "2")),
    Case("l_grace_no_handover", ("--grace-period", "2", "--release-margin", "1")),
    Case("s_sqlite_replicas", ("--replicas", "3")),
    Case(
        "c_overrides",
        ("--engine", "celery", "--app", f"{APPS}:celery_overrides"),
        fresh_process=True,
    ),
    Case(
        "c_no_hard_limit",
        ("--engine", "celery", "--app", f"{APPS}:celery_no_hard_limit"),
        fresh_process=True,
    ),
    # errors before any rule: a bad setting, an app that does not import
    Case("bad_setting", ("--grace-period", "soon")),
    Case("bad_bound", ("--heartbeat-interval", "1e-7")),
    Case("bad_engine", ("--engine", "kafka")),
    Case("missing_app", ("--app", "tests.unit.no_such_module:app")),
)
FORMATS = ("text", "json")
#: The cases also recorded with ``--format helm-values`` (the Helm chart's timing block).
HELM_CASES = (
    "defaults",
    "docs_with_tasks",
    "docs_broken_celery",
    "g_no_drain_window",
    "g_tiny_values",
    "h_sql",
    "v_countdown",
    "i_celery_no_room",
    "l_chain",
    "t_strict",
    "bad_setting",
)
#: The cases also recorded with ``--format svg`` (the picture; docs/pictures/ shows two).
SVG_CASES = (
    "defaults",
    "docs_with_tasks",
    "docs_broken_celery",
    "g_no_drain_window",
    "g_prestop_timeline",
    "g_tiny_values",
    "h_tiny_lease",
    "bad_setting",
)


def _run(case: Case, output_format: str, cwd: Path) -> dict[str, object]:
    args = ["check", *case.args]
    if output_format != "text":
        args += ["--format", output_format]
    if case.fresh_process:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(case.env, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
        command = [sys.executable, "-c", "from workerkit.cli import main; main()", *args]
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, check=False)
        return {
            "exit_code": done.returncode,
            "stdout": done.stdout.decode("utf-8"),
            "stderr": done.stderr.decode("utf-8"),
        }
    for module in [m for m in sys.modules if m.startswith(("examples.", APPS))]:
        del sys.modules[module]  # import the app afresh, as a new process would
    cleared: dict[str, str | None] = {k: None for k in os.environ if k.startswith(ENV_PREFIX)}
    result = CliRunner().invoke(main, args, env={**cleared, **case.env}, catch_exceptions=False)
    return {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}


def _params(formats: tuple[str, ...], names: tuple[str, ...] | None = None) -> list[object]:
    return [
        pytest.param(
            case,
            output_format,
            id=f"{case.name}-{output_format}",
            marks=[pytest.mark.e2e] if case.fresh_process else [],
        )
        for case in CASES
        if names is None or case.name in names
        for output_format in formats
    ]


@pytest.mark.parametrize(
    ("case", "output_format"),
    [*_params(FORMATS), *_params(("helm-values",), HELM_CASES), *_params(("svg",), SVG_CASES)],
)
def test_check_output_is_unchanged(
    case: Case, output_format: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no workerkit.toml or pyproject.toml to find
    got = _run(case, output_format, tmp_path)
    stdout_path = GOLDEN / f"{case.name}.{output_format}.out"
    meta_path = GOLDEN / f"{case.name}.{output_format}.meta.json"
    args = ["check", *case.args]
    if output_format in ("helm-values", "svg"):
        args += ["--format", output_format]
    meta = {"args": args, "env": case.env, "exit_code": got["exit_code"]}
    meta["stderr"] = got["stderr"]
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        stdout_path.write_bytes(str(got["stdout"]).encode("utf-8"))
        meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    assert str(got["stdout"]).encode("utf-8") == stdout_path.read_bytes()
    want = json.loads(meta_path.read_text(encoding="utf-8"))
    assert (got["exit_code"], got["stderr"]) == (want["exit_code"], want["stderr"])


def test_the_docs_samples_are_golden_outputs() -> None:
    doc = (ROOT / "docs" / "concepts" / "timing-budget.md").read_text(encoding="utf-8")
    samples = [block.split("```", 1)[0] for block in doc.split("```text\n")[1:]]
    names = ("defaults", "docs_with_tasks", "docs_broken_celery")
    assert len(samples) == len(names)
    for sample, name in zip(samples, names, strict=True):
        # click.echo ends the report, which already ends with a newline, with another one
        assert sample + "\n" == (GOLDEN / f"{name}.text.out").read_text(encoding="utf-8"), name


def test_every_golden_file_belongs_to_a_case() -> None:
    suffixes = ("out", "meta.json")
    names = {f"{c.name}.{fmt}.{ext}" for c in CASES for fmt in FORMATS for ext in suffixes}
    names |= {f"{name}.helm-values.{ext}" for name in HELM_CASES for ext in suffixes}
    names |= {f"{name}.svg.{ext}" for name in SVG_CASES for ext in suffixes}
    assert {p.name for p in GOLDEN.iterdir()} == names
