"""The exit codes of ``workerkit`` commands, in one place.

Documented in docs/reference/exit-codes.md.

A pod's last state and ``kubectl describe pod`` show the code; each one names a single cause so an
operator can tell a refused configuration from a crashed worker without reading the logs.
"""

from __future__ import annotations

from typing import Final

__all__ = (
    "CHECK_FAILED",
    "CONFIG_ERROR",
    "DESCRIPTIONS",
    "DRILL_FAILED",
    "INTERNAL_ERROR",
    "OK",
    "RELEASE_FAILED",
    "STARTUP_FAILED",
    "STORE_UNAVAILABLE",
    "WORKER_CRASHED",
    "describe",
)

#: Success. For ``workerkit run``: stopped cleanly, nothing was lost (every job finished or was
#: released to its queue, also after a forced kill at the hard deadline when the supervisor
#: could release what was in flight).
OK: Final = 0

#: A check command's answer is "no" (``workerkit check`` found an error, ``db check`` found the
#: schema out of date).
CHECK_FAILED: Final = 1

#: An unexpected internal error (a bug; the traceback is in the log). Python's own code for an
#: uncaught exception, so it is the same number as CHECK_FAILED, which no long-running command
#: returns.
INTERNAL_ERROR: Final = 1

#: Refused to start: an invalid setting, a timing-budget error, an app that cannot be imported,
#: an unknown engine. The message names the setting and the fix.
CONFIG_ERROR: Final = 2

#: The broker or database could not be reached (``db upgrade``; ``workerkit run rq``: Redis stayed
#: unreachable for the whole ``startup_timeout`` at start; ``workerkit run sql``: the database
#: did, or failed in a way no wait can fix).
STORE_UNAVAILABLE: Final = 3

#: ``workerkit run``: the worker could not be started or exited before it was ready (a stop
#: signal before ready, the app not loaded within ``startup_timeout``), or the HTTP port could
#: not be bound.
STARTUP_FAILED: Final = 4

#: ``workerkit run``: the worker process exited without being asked to (a crash, an OOM kill, a
#: SIGKILL from outside). The supervisor released the deliveries it knew to be in flight first;
#: the non-zero code makes the pod restart.
WORKER_CRASHED: Final = 5

#: ``workerkit run``: shutting down, the supervisor could not release every in-flight delivery
#: (store unreachable, or the exit deadline came first). Those jobs come back when their leases
#: (the visibility timeout) expire.
RELEASE_FAILED: Final = 6

#: ``workerkit drill``: the drill ran, and some canary was lost (never completed by the settle
#: deadline) or completed more than once; the report says which.
DRILL_FAILED: Final = 7

#: (name, code, meaning), in code order, for the docs and ``describe``.
DESCRIPTIONS: Final[tuple[tuple[str, int, str], ...]] = (
    ("OK", OK, "success (run: stopped cleanly; nothing was lost)"),
    ("CHECK_FAILED", CHECK_FAILED, "a check found a problem"),
    ("INTERNAL_ERROR", INTERNAL_ERROR, "unexpected internal error (traceback in the log)"),
    ("CONFIG_ERROR", CONFIG_ERROR, "invalid configuration or timing budget; refused to start"),
    ("STORE_UNAVAILABLE", STORE_UNAVAILABLE, "the broker or database could not be reached"),
    (
        "STARTUP_FAILED",
        STARTUP_FAILED,
        "the worker could not be started or exited before it was ready",
    ),
    (
        "WORKER_CRASHED",
        WORKER_CRASHED,
        "the worker exited unexpectedly; its in-flight jobs were released",
    ),
    (
        "RELEASE_FAILED",
        RELEASE_FAILED,
        "in-flight jobs could not be released; they return when their leases expire",
    ),
    (
        "DRILL_FAILED",
        DRILL_FAILED,
        "a drill found a canary lost or completed more than once",
    ),
)


def describe(code: int, *, run: bool = True) -> str:
    """One line saying what ``code`` means (for ``workerkit run`` when ``run``)."""
    if run and code == OK:
        return "stopped cleanly; nothing was lost"
    for name, value, meaning in DESCRIPTIONS:
        if value != code or (run and name == "CHECK_FAILED"):
            continue
        return meaning
    return f"exit code {code}"
