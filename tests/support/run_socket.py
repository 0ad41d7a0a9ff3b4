"""The supervisor's event socket of a pod, from one of its processes' pids.

A process exec'd under the worker has it in its environment (``WORKERKIT_SUPERVISOR_SOCKET``,
as ``/proc/PID/environ`` shows). The worker that ``workerkit run`` forked from its CLI
(supervisor/forked.py) has it only in ``os.environ``: its ``/proc/PID/environ`` is the CLI's.
Then the socket is found by its runtime directory, whose owner file names the supervisor's pid
(workerkit/rundir.py).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from workerkit import rundir
from workerkit.events import SOCKET_ENV

__all__ = ("socket_of",)


def socket_of(pid: int) -> Path:
    """The event socket of the pod whose worker (or supervisor) is ``pid``."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    environ = dict(item.decode().partition("=")[::2] for item in raw if item)
    if SOCKET_ENV in environ:
        return Path(environ[SOCKET_ENV])
    stat = Path(f"/proc/{pid}/stat").read_text()
    parent = int(stat.rsplit(")", 1)[1].split()[1])
    # The pod's temporary directory (its TMPDIR, as the CLI was started with), else ours.
    bases = {Path(environ.get("TMPDIR", "/tmp")), rundir.base_dir(), Path("/tmp")}
    for directory in (d for base in bases for d in base.glob(f"{rundir.PREFIX}*")):
        with contextlib.suppress(OSError, ValueError):
            owner = json.loads((directory / rundir.OWNER_FILE).read_text())
            if owner.get("pid") in (pid, parent):
                return directory / rundir.SOCKET_FILE
    raise LookupError(f"no event socket for pid {pid}")
