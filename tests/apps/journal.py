"""The journal the test apps write: one line per step, to the file named by ``$E2E_JOURNAL``."""

from __future__ import annotations

import os

__all__ = ("record",)


def record(line: str) -> None:
    # O_APPEND writes of one short line are atomic, so concurrent writers do not interleave.
    fd = os.open(os.environ["E2E_JOURNAL"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
