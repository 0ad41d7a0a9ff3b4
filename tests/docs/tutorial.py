"""Running a tutorial page as its reader would, and checking that they see what it says.

A page's steps are its blocks in order: a block marked ``<!-- tutorial: file NAME -->`` is saved
as NAME; a ``console`` block is commands (``$ ...``), each followed by the output the reader
sees. Each command runs in the tutorial's directory with the project's ``workerkit`` on PATH;
each shown line must appear in the output, in order (``...`` matches anything, a line that is
only ``...`` stands for lines not shown, a 32-hex-digit line for any job id). A ``^C`` line is
where the reader presses Ctrl-C: the command runs in the background until every line above it
appeared, gets SIGINT in its process group (as a terminal sends it), and must then show the
lines below and exit 0. A line ``# second terminal: kill -TERM PID`` is the same for SIGTERM,
what Kubernetes sends at a deploy: the reader sends it from another terminal to the pid the
command logged (``supervisor_starting ... pid=...``), and the test to the command's process
(another ``# second terminal:`` command is for a cluster-only block's test to act out). A
command without either must exit 0.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.docs.blocks import ROOT, blocks_of

__all__ = ("Command", "Tutorial", "matcher", "resumed_at", "stopped_at")

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_OWN_WAY = ("helm-sdk", "cluster-only")  # blocks the test runs its own way
_SECOND_TERMINAL = "# second terminal: "
_SIGTERM = re.compile(r"^kill -TERM \S+$")
_WAIT = 120.0  # seconds a shown line (or a command's end) may take: generous, for a loaded machine


def matcher(shown: str) -> re.Pattern[str]:
    """The pattern an output line must match for a line the page shows."""
    if _JOB_ID.match(shown):
        return re.compile(r"[0-9a-f]{32}")
    return re.compile(".*".join(re.escape(part) for part in shown.split("...")))


@dataclass
class Command:
    line: str
    before_interrupt: list[str] = field(default_factory=list)
    after_interrupt: list[str] | None = None  # None: the reader does not press Ctrl-C
    second_terminal: str | None = None  # what the reader runs there, instead of Ctrl-C

    @property
    def shown(self) -> list[str]:
        return [*self.before_interrupt, *(self.after_interrupt or [])]


def _commands(text: str) -> list[Command]:
    commands: list[Command] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("$ "):
            commands.append(Command(line[2:]))
        elif not commands or not line or line == "...":
            continue
        elif line == "^C":
            commands[-1].after_interrupt = []
        elif line.startswith(_SECOND_TERMINAL):
            commands[-1].after_interrupt = []
            commands[-1].second_terminal = line.removeprefix(_SECOND_TERMINAL).strip()
        elif commands[-1].after_interrupt is not None:
            commands[-1].after_interrupt.append(line)
        else:
            commands[-1].before_interrupt.append(line)
    return commands


class _Output:
    """A process's merged stdout and stderr, read line by line in a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        self._stream = process.stdout
        self._reader = threading.Thread(target=self._read, args=(self._stream,), daemon=True)
        self._reader.start()
        self._done = False

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next line, or None at the end of the output; raises at the deadline."""
        if self._done:
            return None
        try:
            line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise AssertionError(
                "timed out waiting for output:\n" + "\n".join(self.lines)
            ) from None
        if line is None:
            self._done = True
        else:
            self.lines.append(line)
        return line

    def expect(self, shown: list[str], on_line: Callable[[str], None] | None = None) -> None:
        """Read until every shown line appeared, in order."""
        deadline = time.monotonic() + _WAIT
        for expected in shown:
            pattern = matcher(expected)
            while True:
                line = self.next_line(deadline)
                if line is None:
                    raise AssertionError(
                        f"the page shows {expected!r}, the output ended without it:\n"
                        + "\n".join(self.lines)
                    )
                if on_line is not None:
                    on_line(line)
                if pattern.fullmatch(line):
                    break

    def close(self) -> None:
        self._reader.join(timeout=_WAIT)
        self._stream.close()

    def drain(self) -> None:
        deadline = time.monotonic() + _WAIT
        while self.next_line(deadline) is not None:
            pass


@dataclass
class Tutorial:
    page: Path
    directory: Path
    env: dict[str, str]
    outputs: list[list[str]] = field(default_factory=list)  # each command's output lines

    @classmethod
    def prepare(cls, page: str, directory: Path, **settings: str) -> Tutorial:
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
        env.update(PATH=f"{bin_dir}:/usr/bin:/bin", PYTHONPATH=str(ROOT), **settings)
        return cls(ROOT / page, directory, env)

    def steps(self) -> Iterator[tuple[str, str | Command]]:
        """("file", NAME) after saving it, or ("command", Command) to run: the page in order.

        A console block marked ``<!-- tutorial: helm-sdk -->`` or ``cluster-only`` gives
        ("helm-sdk", Command) or ("cluster-only", Command): the test runs those its own way
        (tests/docs/cluster.py).
        """
        for block in blocks_of(self.page):
            if block.tutorial.startswith("file "):
                name = block.tutorial.removeprefix("file ").strip()
                (self.directory / name).write_text(block.text, encoding="utf-8")
                yield "file", name
            elif block.lang == "console":
                kind = block.tutorial if block.tutorial in _OWN_WAY else "command"
                for command in _commands(block.text):
                    yield kind, command

    def argv(self, line: str) -> list[str]:
        """The words of a command line, a word with ``*`` expanded in the tutorial's directory
        as the reader's shell would (sorted; kept as it is when nothing matches)."""
        words: list[str] = []
        for word in shlex.split(line):
            found = sorted(self.directory.glob(word)) if "*" in word else []
            if found:
                words.extend(str(path.relative_to(self.directory)) for path in found)
            else:
                words.append(word)
        return words

    def run(self, command: Command, on_line: Callable[[str], None] | None = None) -> list[str]:
        process = subprocess.Popen(
            self.argv(command.line),
            cwd=self.directory,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
        output = _Output(process)
        try:
            output.expect(command.before_interrupt, on_line)
            if command.after_interrupt is not None:
                if command.second_terminal is None:
                    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends
                else:
                    assert _SIGTERM.match(command.second_terminal), command.second_terminal
                    os.kill(process.pid, signal.SIGTERM)  # `kill PID`: that process only
                output.expect(command.after_interrupt, on_line)
            output.drain()
            code = process.wait(timeout=_WAIT)
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            output.close()
        shown = "\n".join(output.lines)
        assert code == 0, f"$ {command.line} exited {code}:\n{shown}"
        self.outputs.append(output.lines)
        return output.lines


def stopped_at(run: list[str]) -> int:
    """The last ``counted to N`` of a run's output (the tutorials' long job; Celery logs it)."""
    counted = [int(m[1]) for line in run if (m := re.search(r"\bcounted to (\d+)$", line))]
    assert counted, run
    return counted[-1]


def resumed_at(run: list[str]) -> list[int]:
    """Every ``starting at N`` of a run's output."""
    return [int(m[1]) for line in run if (m := re.search(r"\bstarting at (\d+)$", line))]
