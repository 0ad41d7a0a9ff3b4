"""Every code block of docs/, README.md and the examples' READMEs is run or checked.

- Python marked ``<!-- example: run -->``: executed in a fresh interpreter (its ``test_*``
  functions called too) and type-checked with ``mypy --strict``, as are the tutorials' Python
  files (which their own tests run).
- Other Python: parsed; every workerkit name it imports or reaches exists and every call to a
  workerkit callable binds to the real signature (tests/docs/pycheck.py).
- Shell: every ``workerkit`` command line is walked down the CLI's command tree, so a renamed
  subcommand or option fails; ``WORKERKIT_*`` assignments name settings (tests/docs/shellcheck.py).
- TOML: parsed (a tutorial's workerkit.toml is also loaded by the tutorial's test);
- YAML and JSON: parsed, and a fragment of the chart's values validated against its schema;
  PromQL: parsed, and its metrics exist in workerkit's registry.
- ``text`` blocks that are ``workerkit check`` output are golden files
  (tests/unit/test_check_golden.py); other text, diagrams, SQL and Dockerfiles are prose.

A block in a language nobody checks fails, so a new kind of block gets a check or a decision.
Our own harness rather than pytest-examples: that plugin runs and lints Python blocks only, and
most of ours are fragments of a page's running example that cannot run alone; what drifts here
is workerkit's own names, keywords, commands, options and settings, checked against the code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.chart.test_observability import problems_of as promql_problems
from tests.chart.test_observability import registry_series
from tests.docs import pycheck, shellcheck
from tests.docs.blocks import ROOT, Block, every_block
from tests.docs.cluster import merge_values

BLOCKS = every_block()
CHART_SCHEMA = ROOT / "deploy" / "helm" / "workerkit" / "values.schema.json"
CHART_VALUES = CHART_SCHEMA.with_name("values.yaml")
#: Languages shown as they are: diagrams, sample output, and languages with no parser here.
PROSE = ("text", "mermaid", "sql", "dockerfile")
RUNNER = """\
import runpy, sys
namespace = runpy.run_path(sys.argv[1], run_name="example")
for name, value in list(namespace.items()):
    if name.startswith("test_") and callable(value):
        value()
"""


def _ids(blocks: list[Block]) -> list[str]:
    return [block.where for block in blocks]


def _of(*langs: str, marker: str | None = None) -> list[Block]:
    return [
        block
        for block in BLOCKS
        if block.lang in langs
        and not block.marker.startswith("skip")
        and (marker is None or block.marker == marker)
    ]


RUNNABLE = _of("python", "py", marker="run")


def test_every_block_has_a_known_language() -> None:
    known = {"python", "py", "yaml", "yml", "json", "toml", "promql", *shellcheck.SHELL_LANGS}
    known |= set(PROSE)
    unknown = [f"{block.where} ```{block.lang}" for block in BLOCKS if block.lang not in known]
    assert unknown == []


def test_markers_are_known() -> None:
    bad = [
        block.where
        for block in BLOCKS
        if block.marker and block.marker != "run" and not block.marker.startswith("skip ")
    ]
    assert bad == []


@pytest.mark.parametrize("block", _of("python", "py"), ids=_ids(_of("python", "py")))
def test_python_block_names_and_calls_exist(block: Block) -> None:
    assert pycheck.problems_of(block.text) == []


@pytest.mark.parametrize("block", RUNNABLE, ids=_ids(RUNNABLE))
def test_runnable_python_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.text, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(script)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


TUTORIAL_FILES = [b for b in BLOCKS if b.lang == "python" and b.tutorial.startswith("file ")]
#: What one mypy run checks: the runnable blocks (each its own file), or one tutorial's files
#: side by side (they import each other, and two tutorials may both have a tasks.py).
TYPE_CHECKED = {
    "runnable blocks": RUNNABLE,
    **{
        str(page.relative_to(ROOT)): [b for b in TUTORIAL_FILES if b.path == page]
        for page in sorted({b.path for b in TUTORIAL_FILES})
    },
}


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy_cache")


@pytest.mark.parametrize("group", sorted(TYPE_CHECKED))
def test_runnable_blocks_and_tutorial_files_type_check(
    group: str, tmp_path: Path, mypy_cache: Path
) -> None:
    files = []
    for index, block in enumerate(TYPE_CHECKED[group]):
        name = block.tutorial.removeprefix("file ").strip() or f"example_{index}.py"
        path = tmp_path / name
        path.write_text(f"# {block.where}\n{block.text}", encoding="utf-8")
        files.append(str(path))
    assert files
    # Celery ships no types: its decorators are untyped, as in any strict project using it
    options = ["--strict", "--allow-untyped-decorators", "--cache-dir", str(mypy_cache)]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *options, *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


SHELL = _of(*shellcheck.SHELL_LANGS)


@pytest.mark.parametrize("block", SHELL, ids=_ids(SHELL))
def test_shell_block_commands_exist(block: Block) -> None:
    assert shellcheck.problems_of(block.text) == []


@pytest.mark.parametrize("block", _of("yaml", "yml", "json"), ids=_ids(_of("yaml", "yml", "json")))
def test_yaml_and_json_blocks_parse(block: Block) -> None:
    if block.lang == "json":
        json.loads(block.text)
        return
    documents = list(yaml.safe_load_all(block.text))
    assert documents
    schema = json.loads(CHART_SCHEMA.read_text(encoding="utf-8"))
    for document in documents:
        if isinstance(document, dict) and set(document) <= set(schema["properties"]):
            # keys of the chart's values: a values fragment, held to the chart's schema over
            # the chart's defaults, as helm validates the values it merged
            merged = merge_values(yaml.safe_load(CHART_VALUES.read_text()), document)
            jsonschema.Draft202012Validator(schema).validate(merged)


@pytest.mark.parametrize("block", _of("toml"), ids=_ids(_of("toml")))
def test_toml_blocks_parse(block: Block) -> None:
    assert tomllib.loads(block.text)


@pytest.mark.parametrize("block", _of("promql"), ids=_ids(_of("promql")))
def test_promql_blocks_parse_and_use_workerkit_metrics(block: Block) -> None:
    series = registry_series()
    expressions = [
        line for line in block.text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert expressions
    problems = {expr: promql_problems(expr, series) for expr in expressions}
    assert {expr: found for expr, found in problems.items() if found} == {}


def test_the_checks_catch_a_renamed_name_keyword_option_or_variable() -> None:
    python = (
        "import workerkit\n"
        "from workerkit.testing import run_jobz\n"
        "app = workerkit.App()\n"
        "@app.task(timeot=3)\n"
        "def f() -> None: ...\n"
        "app.sheddule('x', 'm.f', every=3)\n"
        "workerkit.batches(f, cursor=1)\n"
    )
    assert [problem.split(":")[0] for problem in pycheck.problems_of(python)] == [
        "line 2",
        "line 4",
        "line 6",
        "line 7",
    ]
    shell = "$ WORKERKIT_GRACE=3 workerkit run sql --grace 3 \\\n    --app m:app  # a comment\n"
    shell += "$ workerkit schedule list\n$ ./scripts/nope.sh\nworkerkit output is not a command\n"
    assert len(shellcheck.problems_of(shell)) == 4
