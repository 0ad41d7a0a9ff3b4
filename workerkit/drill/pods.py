"""Replicas of ``workerkit run ENGINE`` on one machine, each run the way the kubelet runs a pod.

A :class:`Pod` has its own name (``HOSTNAME``), health port, run directory and log file; the
kubelet's part is here: probing ``/readyz``, restarting a container that exits by itself, and a
termination (the preStop sleep, SIGTERM to PID 1, SIGKILL at the grace period). The one tricky
why: the kubelet's SIGKILL kills every process of the container at once (its cgroup), so no
worker is left to release a job. Here a container's processes carry a marker in their
environment; they are all frozen (SIGSTOP) before any is killed, so none can fork, notice its
parent's death or release anything in between.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from workerkit.proctree import processes_with_env, signal_processes

__all__ = (
    "POD_MARKER_ENV",
    "Pod",
    "PodEvent",
    "free_port",
    "kill_container",
    "probe",
)

#: Every process of a container inherits ``POD_MARKER_ENV=<container id>`` (not ``WORKERKIT_``:
#: workerkit refuses variables of its own prefix that it does not know).
POD_MARKER_ENV = "WKDRILL_CONTAINER"

#: How often the kubelet here polls a container and its probe (the real one probes every
#: periodSeconds, 5 s in the chart; polling faster only makes a ready pod count sooner).
POLL = 0.1


@dataclass(frozen=True)
class PodEvent:
    """One thing that happened to a pod: wall-clock time, the pod's name, what, details."""

    at: float
    pod: str
    what: str
    detail: str = ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def probe(port: int, path: str = "/readyz", timeout: float = 1.0) -> int | None:
    """The status of ``GET path`` on 127.0.0.1:port, None when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def kill_container(marker: str, pid1: int | None) -> int:
    """SIGKILL every process of one container, as its cgroup is killed: freeze them all first
    (new children are found on each pass), then kill them. Returns how many were killed."""
    stopped: set[int] = set()
    for _ in range(50):
        pids = set(processes_with_env(POD_MARKER_ENV, marker))
        if pid1 is not None:
            pids.add(pid1)
        fresh = pids - stopped
        if not fresh:
            break
        stopped.update(signal_processes(fresh, signal.SIGSTOP))
        stopped.update(fresh)  # gone ones too: nothing left to stop
    return len(signal_processes(stopped, signal.SIGKILL))


@dataclass
class Pod:
    """One replica. ``argv``, ``env`` and ``workdir`` (the image's WORKDIR: where the app
    imports from) are its container's; its log goes to ``logs/NAME.log``, its run directory
    (``TMPDIR``: the supervisor's socket) is its own. The kubelet's part is below."""

    name: str
    revision: int
    argv: Sequence[str]
    env: Mapping[str, str]
    logs: Path
    workdir: Path
    port: int
    grace: float
    prestop: float
    record: Callable[[PodEvent], None]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    #: The exit code of the container's last run that ended by itself (None: none did).
    last_exit: int | None = None
    terminating: bool = False
    marker: str = ""
    _log: IO[bytes] | None = field(default=None, repr=False)
    _tmp: Path | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}.log"

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the pod's log (what a refused start said)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def event(self, what: str, detail: str = "") -> None:
        self.record(PodEvent(time.time(), self.name, what, detail))

    def start(self) -> None:
        """Start (or restart) the container: a fresh process, the same name, port and dirs."""
        with self._lock:
            self.marker = uuid.uuid4().hex
            if self._tmp is None:
                # Short, wherever the drill directory is: the supervisor's socket is in it,
                # and a Unix socket's path has at most 107 bytes.
                self._tmp = Path(tempfile.mkdtemp(prefix="wkdrill-"))
            tmp = self._tmp
            env = {
                **self.env,
                "HOSTNAME": self.name,
                "WORKERKIT_HTTP_HOST": "127.0.0.1",
                "WORKERKIT_HTTP_PORT": str(self.port),
                "TMPDIR": str(tmp),
                POD_MARKER_ENV: self.marker,
            }
            if self._log is None:
                self._log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
            )
        what = "restarted" if self.restarts else "created"
        self.event(what, f"pid {self.proc.pid}, port {self.port}")

    def exit_code(self) -> int | None:
        """The container's exit code, None while it runs."""
        proc = self.proc
        return None if proc is None else proc.poll()

    def ready(self) -> bool:
        """The readinessProbe: ``/readyz`` answers 200 while the container runs."""
        return self.exit_code() is None and probe(self.port) == 200

    def wait_ready(self, timeout: float) -> bool:
        """Probe until ready; False when the container exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exit_code() is not None:
                return False
            if self.ready():
                return True
            time.sleep(POLL)
        return False

    def crash(self) -> None:
        """The container dies at once (an OOM kill, a node's fault): every process SIGKILLed."""
        proc = self.proc
        if proc is None:
            return
        killed = kill_container(self.marker, proc.pid)
        proc.wait()
        self.event("crashed", f"SIGKILL to its {killed} processes")

    def terminate(self) -> None:
        """The pod's deletion: preStop sleep, SIGTERM to PID 1, SIGKILL of the whole container
        when the grace period (counted from the start of the termination) is spent."""
        self.terminating = True
        proc = self.proc
        if proc is None:
            return
        begun = time.monotonic()
        self.event("terminating", f"preStop {self.prestop:g} s, grace period {self.grace:g} s")
        if self.prestop > 0:
            time.sleep(self.prestop)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        self.event("sigterm", f"after {time.monotonic() - begun:.1f} s")
        try:
            proc.wait(max(0.0, self.grace - (time.monotonic() - begun)))
        except subprocess.TimeoutExpired:
            killed = kill_container(self.marker, proc.pid)
            proc.wait()
            self.event("sigkill", f"grace period {self.grace:g} s spent: {killed} processes")
        else:
            kill_container(self.marker, None)  # what outlived PID 1 goes with the container
        self.event(
            "exited",
            f"code {proc.returncode} after {time.monotonic() - begun:.1f} s",
        )
        self.close()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
