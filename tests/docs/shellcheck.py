"""The command lines of the docs' shell blocks, checked against the real ``workerkit`` command.

Each ``workerkit ...`` line is walked down the CLI's own command tree (what ``--help`` prints is
generated from it): every subcommand must exist and every ``--option`` must be one that command
takes. Each ``WORKERKIT_*=`` assignment must name a setting or a variable a command reads for its
own option (``--help`` shows them), and a ``./scripts/...`` line a script that exists. Other
programs (helm, kubectl, docker, curl) are not checked here.
"""

from __future__ import annotations

import re
import shlex

import click

from tests.docs.blocks import ROOT
from workerkit.cli import main
from workerkit.settings import ENV_PREFIX, Settings

__all__ = ("SHELL_LANGS", "command_lines", "problems_of")

SHELL_LANGS = ("sh", "bash", "shell", "console", "")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
#: Variables workerkit reads that are not settings (the config file's path).
_NOT_SETTINGS = {f"{ENV_PREFIX}CONFIG"}


def command_lines(text: str) -> list[str]:
    """The commands of a block: ``$ `` prompts stripped, continuations joined, comments cut.

    In a block with prompts, only the prompted lines are commands (the others are output).
    """
    lines: list[str] = []
    pending = ""
    prompted = any(raw.lstrip().startswith("$ ") for raw in text.splitlines())
    for raw in text.splitlines():
        line = raw.rstrip()
        if not pending and line.lstrip().startswith("$ "):
            line = line.lstrip()[2:]
        elif not pending and prompted:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [cut for cut in (_without_comment(line) for line in lines) if cut]


def _without_comment(line: str) -> str:
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        return shlex.join(list(lexer))
    except ValueError:
        return line.strip()


def _settings_env() -> set[str]:
    """The settings' variables, and those a command reads for its own options (``workerkit
    dashboard``'s WORKERKIT_DASHBOARD_*: not settings, they configure that command only)."""
    return (
        {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
        | _NOT_SETTINGS
        | _command_env(main)
    )


def _command_env(command: click.Command) -> set[str]:
    found = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            found.add(envvar)
        elif envvar:
            found.update(envvar)
    if isinstance(command, click.Group):
        context = click.Context(command)
        for name in command.list_commands(context):  # `drill` is loaded when asked for
            sub = command.get_command(context, name)
            if sub is not None:
                found |= _command_env(sub)
    return found


def _check_workerkit(words: list[str]) -> list[str]:
    command: click.Command = main
    path = ["workerkit"]
    rest = words[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        if sub is None:
            return [f"{' '.join(path)} has no subcommand {rest[0]!r}"]
        command, path, rest = sub, [*path, rest[0]], rest[1:]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    known |= {"--help", "-h"} if isinstance(command, click.Group) else {"--help"}
    problems = []
    for word in rest:
        if word.startswith("-") and word != "-":
            option = word.split("=", 1)[0]
            if option not in known:
                problems.append(f"{' '.join(path)} takes no option {option}")
    return problems


def problems_of(text: str) -> list[str]:
    problems: list[str] = []
    settings_env = _settings_env()
    for line in command_lines(text):
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        while words and _ASSIGNMENT.match(words[0]):
            name = words.pop(0).split("=", 1)[0]
            if name.startswith(ENV_PREFIX) and name not in settings_env:
                problems.append(f"{name} is not a setting's variable: {line}")
        if not words:
            continue
        if words[0] == "workerkit":
            problems += [f"{problem}: {line}" for problem in _check_workerkit(words)]
        elif words[0].startswith("./") and not (ROOT / words[0]).is_file():
            problems.append(f"no such script {words[0]}: {line}")
    return problems
