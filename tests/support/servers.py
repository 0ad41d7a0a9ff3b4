"""Private redis-server and PostgreSQL instances for the test suite.

Plain helpers, no pytest in here: ``tests/conftest.py`` wraps them in fixtures and turns
:class:`ServerUnavailableError` into a skip (locally) or a failure (when ``CI`` is set).

Every server is ours alone: it listens on 127.0.0.1 on a free port, keeps its files in a fresh
temporary directory, writes its output to a log file there, runs in its own session (so a Ctrl-C
on the terminal does not reach it before pytest has finished) and is stopped by *its own pid*.
Nothing here looks up, signals or touches any other process or system service.

Fallbacks, in order: the fixture finalizer (normal end, failing tests, Ctrl-C), an ``atexit``
hook (finalizers skipped), and on Linux a parent-death signal so that the servers go away even
when the pytest process is killed with SIGKILL.

PostgreSQL refuses to run as root. When the tests run as root (containers, CI), ``initdb`` and
``postgres`` are started as the system ``postgres`` user (``subprocess`` ``user=``/``group=``),
in a temporary directory chowned to that user; the directory is created directly under the
system temporary directory (``/tmp`` is world-traversable), not under pytest's 0700 basetemp.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypedDict

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.02
POSTGRES_USER = "postgres"


class ServerUnavailableError(Exception):
    """The server binary is missing or the server could not be started."""


# --------------------------------------------------------------------------------------------
# process plumbing


# Ports handed out below the kernel's ephemeral range. A port from bind(("", 0)) comes from
# that range, and so does the local port of every outgoing connection any process opens: under
# the two parallel test groups (thousands of Redis and PostgreSQL client connections) such a
# port was taken by somebody's connect() between the pick and the server's bind (a scheduler
# replica's http_bind_failed in CI). No connect() is ever given a port below the range.
_LISTEN_PORTS = range(20000, 32000)
_pick = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range when
    the system says where that is (the caller retries on a clash)."""
    candidates = _LISTEN_PORTS if _ephemeral_low() >= _LISTEN_PORTS.stop else range(0)
    for _ in range(50 if candidates else 0):
        port = _pick.choice(candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _parent_death_signal(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send *sig* to the child when pytest dies.

    Runs in the child after ``subprocess`` has switched user/group (a credential change clears
    the setting, so it must come after). The libc function is looked up here, in the parent.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    try:
        prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    signum = int(sig)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signum)

    return preexec


class _UserKwargs(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


def _as_user(user: str | None) -> _UserKwargs:
    """``subprocess`` keyword arguments that run the child as *user* (None: as ourselves)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _child_env(home: Path) -> dict[str, str]:
    """A small, predictable environment: no PG*/REDIS* settings leak in from the caller."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C",
        "LC_ALL": "C",
        "TZ": "UTC",
    }
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]
    return env


def _read_log(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return text[-limit:] if len(text) > limit else text


@dataclass(eq=False)
class _Process:
    """A server process started by us, with its log file; stopped by its own pid."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: signal.Signals
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        name: str,
        argv: list[str],
        *,
        log_path: Path,
        cwd: Path,
        stop_signal: signal.Signals,
        user: str | None,
    ) -> _Process:
        log_file = log_path.open("ab")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=_child_env(cwd),
                start_new_session=True,
                preexec_fn=_parent_death_signal(stop_signal),
                **_as_user(user),
            )
        except BaseException:
            log_file.close()
            raise
        proc = cls(name, popen, log_path, stop_signal, log_file)
        _LIVE.add(proc)
        return proc

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def log(self) -> str:
        return _read_log(self.log_path)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Signal our own pid, wait for it; SIGKILL if it does not go. Idempotent."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(self.stop_signal)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self.popen.kill()
                    self.popen.wait(timeout)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            _LIVE.discard(self)


_LIVE: set[_Process] = set()
_TEMP_DIRS: set[Path] = set()


def _make_temp_dir(prefix: str, base: Path | None = None) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    _TEMP_DIRS.add(directory)
    return directory


def _remove_temp_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    _TEMP_DIRS.discard(directory)


@atexit.register
def _stop_leftovers() -> None:  # pragma: no cover - only when fixture teardown did not run
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop(timeout=5)
    for directory in list(_TEMP_DIRS):
        _remove_temp_dir(directory)


def wait_until(
    probe: Callable[[], bool],
    proc: _Process,
    *,
    what: str,
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll *probe* until it returns True; raise with the server log if *proc* exits or time runs
    out."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        if proc.exited():
            raise ServerUnavailableError(
                f"{what} exited with code {proc.popen.returncode} before it was ready; "
                f"its output ({proc.log_path.name}):\n{proc.log()}"
            )
        try:
            if probe():
                return
        except Exception as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise ServerUnavailableError(
                f"{what} was not ready after {timeout:.0f}s (last probe error: {last_error}); "
                f"its output ({proc.log_path.name}):\n{proc.log()}"
            )
        time.sleep(POLL_INTERVAL)


def _ready_or_port_taken(
    proc: _Process, ready: Callable[[], bool], what: str, *, retry: bool
) -> bool:
    """Wait until ``ready()``: True; False (the process stopped) when the server lost its port
    to another process and ``retry`` allows another attempt; otherwise stop it and raise."""
    try:
        wait_until(ready, proc, what=what)
    except BaseException as exc:
        proc.stop()
        if isinstance(exc, ServerUnavailableError) and retry and _address_in_use(proc.log()):
            return False
        raise
    return True


def _address_in_use(log: str) -> bool:
    return bool(re.search(r"address already in use", log, re.IGNORECASE))


# --------------------------------------------------------------------------------------------
# redis


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise ServerUnavailableError(
            "redis-server not found on PATH (apt-get install redis-server; ./scripts/test.sh "
            "does this when run as root)"
        )
    return path


class _Owned:
    """A server process of ours and its temporary directory, both gone after :meth:`stop`."""

    directory: Path
    process: _Process

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        try:
            self.process.stop()
        finally:
            _remove_temp_dir(self.directory)


@dataclass
class RedisServer(_Owned):
    host: str
    port: int
    directory: Path
    process: _Process

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"


def start_redis(
    *,
    attempts: int = 3,
    port: int | None = None,
    directory: Path | None = None,
    appendonly: bool = False,
) -> RedisServer:
    """Start a private redis-server and wait until it answers PING.

    Non-persistent unless ``appendonly``. ``port`` and ``directory`` start it where a server of
    ours ran before (:func:`restart_redis`), or on a port a test handed out before the server
    was up; the caller then owns the clash with another process, if any (one attempt).
    """
    import redis

    binary = find_redis_server()
    owned = directory is None
    directory = _make_temp_dir("workerkit-redis-") if directory is None else directory
    if port is not None:
        attempts = 1
    try:
        for attempt in range(1, attempts + 1):
            chosen = free_port() if port is None else port
            proc = _Process.start(
                "redis-server",
                [
                    binary,
                    "--port",
                    str(chosen),
                    "--bind",
                    HOST,
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if appendonly else "no",
                    "--dir",
                    str(directory),
                    "--daemonize",
                    "no",
                    "--logfile",
                    "",
                ],
                log_path=directory / "redis.log",
                cwd=directory,
                stop_signal=signal.SIGTERM,
                user=None,
            )

            def ping(port: int = chosen) -> bool:
                client = redis.Redis(
                    host=HOST, port=port, socket_connect_timeout=1, socket_timeout=1
                )
                try:
                    return bool(client.ping())
                finally:
                    client.close()

            what = f"redis-server on {HOST}:{chosen}"
            if not _ready_or_port_taken(proc, ping, what, retry=attempt < attempts):
                continue  # another process took the port between free_port() and bind
            return RedisServer(HOST, chosen, directory, proc)
    except BaseException:
        if owned:
            _remove_temp_dir(directory)
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def restart_redis(server: RedisServer, *, down_for: float = 0.0) -> RedisServer:
    """Stop ``server``'s process by its pid, wait ``down_for`` seconds, start it again.

    Same port and directory, append-only file on: when ``server`` was started with
    ``appendonly`` its data survives the restart, as a production Redis's does. Stop the
    server given back, not ``server`` (both would remove the directory they share).
    """
    server.process.stop()
    time.sleep(down_for)
    return start_redis(port=server.port, directory=server.directory, appendonly=True)


# --------------------------------------------------------------------------------------------
# postgres


def _pg_bindir_candidates() -> Iterator[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out:
                yield Path(out)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    yield from debian
    for name in ("initdb", "postgres"):
        found = shutil.which(name)
        if found is not None:
            yield Path(found).resolve().parent


def find_postgres_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres`` (pg_config, then Debian, then PATH)."""
    for bindir in _pg_bindir_candidates():
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres")):
            return bindir
    raise ServerUnavailableError(
        "PostgreSQL server binaries (initdb, postgres) not found via pg_config, "
        "/usr/lib/postgresql/*/bin or PATH (apt-get install postgresql; ./scripts/test.sh "
        "does this when run as root)"
    )


def _postgres_run_as() -> str | None:
    """Which user runs initdb/postgres: ourselves, or ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise ServerUnavailableError(
            f"running as root and there is no {POSTGRES_USER!r} system user to run PostgreSQL "
            "as (PostgreSQL refuses to run as root; installing the postgresql package creates it)"
        ) from None
    return POSTGRES_USER


def _world_traversable(path: Path) -> bool:
    for part in (path, *path.parents):
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def _make_postgres_dir(run_as: str | None) -> Path:
    base = Path(tempfile.gettempdir())
    if run_as is not None and not _world_traversable(base):
        base = Path("/tmp")
    directory = _make_temp_dir("workerkit-pg-", base)
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    return directory


@dataclass
class PostgresServer(_Owned):
    host: str
    port: int
    user: str
    directory: Path
    process: _Process

    def url(self, dbname: str = "postgres", driver: str = "psycopg") -> str:
        """A SQLAlchemy URL (``postgresql+psycopg://...``)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq connection string for psycopg."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"


def _run_initdb(bindir: Path, directory: Path, run_as: str | None) -> Path:
    datadir = directory / "data"
    log_path = directory / "initdb.log"
    with log_path.open("wb") as log:
        try:
            result = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "--pgdata",
                    str(datadir),
                    "--username",
                    POSTGRES_USER,
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
                env=_child_env(directory),
                timeout=120,
                check=False,
                **_as_user(run_as),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ServerUnavailableError(f"initdb failed to run: {exc}") from exc
    if result.returncode != 0:
        raise ServerUnavailableError(
            f"initdb exited with code {result.returncode}; its output:\n{_read_log(log_path)}"
        )
    return datadir


def start_postgres(
    *, attempts: int = 3, port: int | None = None, directory: Path | None = None
) -> PostgresServer:
    """initdb a throwaway cluster and run ``postgres`` on 127.0.0.1 on a free port.

    Durability is switched off (fsync, synchronous_commit, full_page_writes): the cluster is
    deleted at the end of the session anyway. ``port`` and ``directory`` start the cluster a
    server of ours ran before (:func:`restart_postgres`), keeping its data (one attempt).
    """
    import psycopg

    bindir = find_postgres_bindir()
    run_as = _postgres_run_as()
    owned = directory is None
    directory = _make_postgres_dir(run_as) if directory is None else directory
    if port is not None:
        attempts = 1
    try:
        datadir = _run_initdb(bindir, directory, run_as) if owned else directory / "data"
        for attempt in range(1, attempts + 1):
            chosen = free_port() if port is None else port
            proc = _Process.start(
                "postgres",
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(datadir),
                    "-h",
                    HOST,
                    "-p",
                    str(chosen),
                    "-k",
                    str(directory),
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "logging_collector=off",
                ],
                log_path=directory / "postgres.log",
                cwd=directory,
                # SIGINT is PostgreSQL's "fast shutdown": roll back sessions, exit promptly.
                stop_signal=signal.SIGINT,
                user=run_as,
            )
            server = PostgresServer(HOST, chosen, POSTGRES_USER, directory, proc)

            def ready(server: PostgresServer = server) -> bool:
                with psycopg.connect(server.conninfo(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True

            what = f"postgres on {HOST}:{chosen}"
            if not _ready_or_port_taken(proc, ready, what, retry=attempt < attempts):
                continue  # another process took the port between free_port() and bind
            return server
    except BaseException:
        if owned:
            _remove_temp_dir(directory)
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def restart_postgres(server: PostgresServer, *, down_for: float = 0.0) -> PostgresServer:
    """Stop ``server``'s postmaster by its pid (fast shutdown: sessions are cut), wait
    ``down_for`` seconds, start the same cluster again on the same port.

    The data survives, as a production database's does across a restart or a failover. Stop
    the server given back, not ``server`` (both would remove the directory they share).
    """
    server.process.stop()
    time.sleep(down_for)
    return start_postgres(port=server.port, directory=server.directory)


# --------------------------------------------------------------------------------------------
# postgres databases


TEMPLATE_DATABASE = "workerkit_template"
TEMPLATE_MARKER = "workerkit test template"


def create_template(
    server: PostgresServer,
    setup: list[Callable[[str], None]],
    name: str = TEMPLATE_DATABASE,
) -> str:
    """Create the template database, run each *setup* callable with its SQLAlchemy URL, then
    freeze it (IS_TEMPLATE, no connections) so every ``CREATE DATABASE ... TEMPLATE`` works.

    The public schema's comment is set to :data:`TEMPLATE_MARKER`; databases made from the
    template carry it, which is how a test can tell where its database came from.
    """
    import psycopg
    from psycopg import sql

    ident = sql.Identifier(name)
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    with psycopg.connect(server.conninfo(name), autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON SCHEMA public IS {}").format(sql.Literal(TEMPLATE_MARKER)))
    for step in setup:
        step(server.url(name))
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(ident)
        )
        # A setup step that left a pooled connection behind would block every copy.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    return name


def create_database(server: PostgresServer, name: str, template: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )


def drop_database(server: PostgresServer, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
