"""A rollout of N replicas of ``workerkit run ENGINE`` on one machine, as Kubernetes does it.

The Deployment controller's rolling update (``maxSurge``/``maxUnavailable``: a new pod is
created, and an old one deleted only while enough pods stay ready), ``kubectl rollout restart``
K times, crashes (the kubelet restarts the container in place, with its back-off) and a store
restart by the command the operator gives. The pods themselves are :mod:`workerkit.drill.pods`.
Why the controller counts as it does: terminating pods count against neither ``maxSurge`` nor
the available pods, so old pods drain while the rollout goes on, as in a cluster.
"""

from __future__ import annotations

import math
import random
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from workerkit import exitcodes
from workerkit.drill.pods import POLL, Pod, PodEvent, free_port
from workerkit.errors import ConfigurationError

__all__ = (
    "Action",
    "CommandStore",
    "Rollout",
    "RolloutError",
    "RolloutSpec",
    "StoreControl",
    "plan_actions",
    "render_timeline",
    "resolve_strategy",
    "store_address",
)

#: The kubelet's restart back-off of a container that keeps exiting: 10 s, doubled each time,
#: at most 5 minutes (CrashLoopBackOff); the first restart is immediate.
BACKOFF_START = 10.0
BACKOFF_MAX = 300.0


class RolloutError(RuntimeError):
    """The rollout cannot go on: a pod never got ready, a store did not come back."""


def _count(value: int | str, replicas: int, *, round_up: bool, what: str) -> int:
    """An int-or-percent of the rollingUpdate strategy as a number of pods (Kubernetes rounds
    maxSurge up and maxUnavailable down)."""
    if isinstance(value, int):
        count = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(%?)\s*", str(value))
        if match is None:
            raise ConfigurationError(
                f"{what} {value!r}: expected a number of pods (1) or a percentage (25%)"
            )
        count = int(match.group(1))
        if match.group(2):
            exact = count * replicas / 100
            count = math.ceil(exact) if round_up else math.floor(exact)
    if count < 0:
        raise ConfigurationError(f"{what} {value!r}: must not be negative")
    return count


def resolve_strategy(
    replicas: int, max_surge: int | str, max_unavailable: int | str
) -> tuple[int, int]:
    """``(surge, unavailable)`` in pods, refused as Kubernetes refuses them."""
    if replicas < 1:
        raise ConfigurationError(f"replicas {replicas}: at least 1")
    surge = _count(max_surge, replicas, round_up=True, what="max-surge")
    unavailable = _count(max_unavailable, replicas, round_up=False, what="max-unavailable")
    if surge == 0 and unavailable == 0:
        raise ConfigurationError(
            "max-surge and max-unavailable are both 0: no pod could ever be replaced "
            "(Kubernetes refuses it too); set --max-surge 1"
        )
    return surge, unavailable


def store_address(url: str) -> tuple[str, int] | None:
    """Host and port of a Redis or PostgreSQL URL (None for SQLite: no server)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme == "sqlite":
        return None
    default = {"redis": 6379, "rediss": 6379, "postgresql": 5432, "postgres": 5432}.get(scheme)
    if default is None:
        raise ConfigurationError(f"store URL scheme {parts.scheme!r}: redis or postgresql")
    return parts.hostname or "127.0.0.1", parts.port or default


class StoreControl:
    """How the drill restarts the store its workers use: :meth:`restart` returns once the store
    answers again. The drill never stops a server it was not told how to restart."""

    def describe(self) -> str:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError


@dataclass
class CommandStore(StoreControl):
    """The operator's command restarts it (``docker restart redis``, ``pg_ctl -D DIR restart``,
    ``systemctl restart redis-server``); then the store's port must accept connections."""

    command: str
    address: tuple[str, int]
    timeout: float = 120.0

    def describe(self) -> str:
        return f"{self.command!r}, then {self.address[0]}:{self.address[1]} answers"

    def restart(self) -> None:
        done = subprocess.run(
            shlex.split(self.command), check=False, timeout=self.timeout, capture_output=True
        )
        if done.returncode != 0:
            raise RolloutError(
                f"store restart command {self.command!r} exited with {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()[-500:]}"
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                sock.settimeout(1.0)
                if sock.connect_ex(self.address) == 0:
                    return
            time.sleep(POLL)
        raise RolloutError(f"the store at {self.address} did not answer after its restart")


@dataclass(frozen=True)
class RolloutSpec:
    """The Deployment: its pods' command and env, replicas, strategy and termination."""

    argv: Sequence[str]
    env: Mapping[str, str]
    replicas: int = 3
    max_surge: int | str = 1
    max_unavailable: int | str = 0
    grace: float = 30.0
    prestop: float = 0.0
    #: How long a pod may take to be ready (the startupProbe's budget).
    ready_timeout: float = 120.0
    #: The containers' working directory (None: this one), where the app is imported from.
    workdir: Path | None = None
    name: str = "drill"


@dataclass(frozen=True)
class Action:
    """One step of the plan: ``restart`` (kubectl rollout restart), ``crash`` or ``store``, no
    sooner than ``at`` seconds after the plan starts."""

    kind: str
    at: float


def plan_actions(restarts: int, crashes: int, store: int, window: float) -> list[Action]:
    """The actions, each kind spread evenly among the others, at even times over ``window``
    seconds (a crash or a store restart falls between two rollouts)."""
    keyed = [((i + 0.5) / restarts, 1, "restart") for i in range(restarts)]
    keyed += [((i + 1) / (crashes + 1), 0, "crash") for i in range(crashes)]
    keyed += [((i + 1) / (store + 1), 0, "store") for i in range(store)]
    kinds = [kind for *_, kind in sorted(keyed)]
    return [Action(kind, window * (j + 0.5) / len(kinds)) for j, kind in enumerate(kinds)]


@dataclass
class Rollout:
    """The replicas of one Deployment and the controller that rolls them (see the module)."""

    spec: RolloutSpec
    directory: Path
    store: StoreControl | None = None
    on_event: Callable[[PodEvent], None] | None = None
    seed: int | None = None
    events: list[PodEvent] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    revision: int = 0
    _serial: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closing: threading.Event = field(default_factory=threading.Event)
    _terminations: list[threading.Thread] = field(default_factory=list)
    _kubelet: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.surge, self.unavailable = resolve_strategy(
            self.spec.replicas, self.spec.max_surge, self.spec.max_unavailable
        )
        self._random = random.Random(self.seed)

    # --- events -----------------------------------------------------------------------

    def _record(self, event: PodEvent) -> None:
        with self._lock:
            self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def note(self, what: str, detail: str = "") -> None:
        self._record(PodEvent(time.time(), "-", what, detail))

    # --- pods -------------------------------------------------------------------------

    def live(self) -> list[Pod]:
        """The pods that are not terminating (what a ReplicaSet counts)."""
        with self._lock:
            return [p for p in self.pods if not p.terminating]

    def _create(self) -> Pod:
        self._serial += 1
        name = f"{self.spec.name}-r{self.revision}-{self._serial}"
        logs = self.directory / "pods"
        logs.mkdir(parents=True, exist_ok=True)
        pod = Pod(
            name=name,
            revision=self.revision,
            argv=self.spec.argv,
            env=self.spec.env,
            logs=logs,
            workdir=Path(self.spec.workdir or Path.cwd()),
            port=free_port(),
            grace=self.spec.grace,
            prestop=self.spec.prestop,
            record=self._record,
        )
        with self._lock:
            self.pods.append(pod)
        pod.start()
        return pod

    def _terminate(self, pod: Pod) -> None:
        pod.terminating = True
        thread = threading.Thread(target=pod.terminate, name=f"terminate-{pod.name}", daemon=True)
        self._terminations.append(thread)
        thread.start()

    def _kubelet_loop(self) -> None:
        """restartPolicy Always: a container that exits by itself is started again, in place,
        after the kubelet's back-off."""
        due: dict[str, float] = {}
        while not self._closing.wait(POLL):
            for pod in self.live():
                code = pod.exit_code()
                if code is None or pod.terminating:
                    continue
                if pod.name not in due:
                    pod.last_exit = code
                    wait = 0.0 if pod.restarts == 0 else BACKOFF_START * 2 ** (pod.restarts - 1)
                    due[pod.name] = time.monotonic() + min(wait, BACKOFF_MAX)
                    pod.event("exited", f"code {code}; restart in {min(wait, BACKOFF_MAX):g} s")
                if time.monotonic() >= due[pod.name] and not self._closing.is_set():
                    del due[pod.name]
                    pod.restarts += 1
                    pod.start()

    # --- the controller ---------------------------------------------------------------

    def start(self) -> None:
        """The Deployment's first pods, all ready (or :class:`RolloutError`)."""
        self.revision = 1
        self.note("deployment", f"{self.spec.replicas} replicas")
        self._kubelet = threading.Thread(target=self._kubelet_loop, name="kubelet", daemon=True)
        self._kubelet.start()
        for _ in range(self.spec.replicas):
            self._create()
        self._wait_all_ready(self.live())

    def _wait_all_ready(self, pods: Sequence[Pod]) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout
        pending = list(pods)
        while pending:
            pending = [p for p in pending if not p.ready()]
            if not pending:
                break
            failing = [p for p in pods if p.last_exit == exitcodes.CONFIG_ERROR or p.restarts > 1]
            if failing:
                raise RolloutError(
                    f"{failing[0].name} exited with {failing[0].last_exit} before it was ready "
                    f"({failing[0].restarts} restarts); the end of {failing[0].log_path}:\n"
                    f"{failing[0].log_tail()}"
                )
            if time.monotonic() >= deadline:
                names = ", ".join(p.name for p in pending)
                raise RolloutError(
                    f"{names} not ready within {self.spec.ready_timeout:g} s; see "
                    f"{pending[0].log_path}"
                )
            time.sleep(POLL)
        for pod in pods:
            pod.event("ready")

    def restart(self) -> None:
        """``kubectl rollout restart``: a new revision rolled out under the strategy. Returns
        when every new pod is ready and every old one is terminating (old pods drain on)."""
        old = self.live()
        self.revision += 1
        self.note("rollout", f"revision {self.revision}")
        new: list[Pod] = []
        seen_ready: set[str] = set()
        deadline = time.monotonic() + self.spec.ready_timeout * max(1, self.spec.replicas)
        replicas, surge, unavailable = self.spec.replicas, self.surge, self.unavailable
        while old or len(new) < replicas or len(seen_ready) < replicas:
            if time.monotonic() >= deadline:
                raise RolloutError(f"rollout to revision {self.revision} made no progress")
            while len(new) < replicas and len(old) + len(new) < replicas + surge:
                new.append(self._create())
            ready = {p.name for p in old + new if p.ready()}
            for pod in new:
                if pod.name in ready and pod.name not in seen_ready:
                    seen_ready.add(pod.name)
                    pod.event("ready")
            new_unready = sum(1 for p in new if p.name not in ready)
            can_remove = len(old) + len(new) - (replicas - unavailable) - new_unready
            # Unready old pods go first: removing them costs no availability.
            for pod in sorted(old, key=lambda p: p.name in ready):
                if can_remove <= 0:
                    break
                old.remove(pod)
                self._terminate(pod)
                can_remove -= 1
            time.sleep(POLL)
        self.note("rolled out", f"revision {self.revision}")

    def crash(self) -> None:
        """A random live pod's container is SIGKILLed; the kubelet restarts it in place."""
        live = [p for p in self.live() if p.exit_code() is None]
        if not live:
            return
        pod = self._random.choice(live)
        pod.crash()
        deadline = time.monotonic() + self.spec.ready_timeout + BACKOFF_START
        while time.monotonic() < deadline and not pod.ready():
            time.sleep(POLL)
        pod.event("ready" if pod.ready() else "not ready")

    def restart_store(self) -> None:
        if self.store is None:
            raise RolloutError("no store to restart was given")
        self.note("store restart", self.store.describe())
        self.store.restart()
        self.note("store back")

    def run(self, actions: Sequence[Action], stop: threading.Event | None = None) -> int:
        """Each action in turn, no sooner than its time (from now), until ``stop`` is set; how
        many were done."""
        begun = time.monotonic()
        stop = stop or threading.Event()
        steps: dict[str, Callable[[], None]] = {
            "restart": self.restart,
            "crash": self.crash,
            "store": self.restart_store,
        }
        for done, action in enumerate(actions):
            if stop.wait(max(0.0, begun + action.at - time.monotonic())):
                return done
            steps[action.kind]()
        return len(actions)

    def shutdown(self) -> None:
        """Every pod deleted as the kubelet deletes it, at once; returns when all are gone."""
        for pod in self.live():
            self._terminate(pod)
        self._closing.set()
        for thread in list(self._terminations):
            thread.join()
        if self._kubelet is not None:
            self._kubelet.join()

    def kill(self) -> None:
        """The error path: every container SIGKILLed, nothing waited for."""
        self._closing.set()
        with self._lock:
            pods = list(self.pods)
        for pod in pods:
            if pod.exit_code() is None:
                pod.crash()
            pod.close()


def render_timeline(events: Sequence[PodEvent], since: float | None = None) -> str:
    """The pods' starts and stops as text, one line an event, seconds from ``since`` (default:
    the first event)."""
    if not events:
        return "no pod events"
    origin = events[0].at if since is None else since
    width = max(len(e.pod) for e in events)
    lines = [f"{'t (s)':>7}  {'pod':<{width}}  event"]
    for e in sorted(events, key=lambda e: e.at):
        detail = f" ({e.detail})" if e.detail else ""
        lines.append(f"{e.at - origin:7.1f}  {e.pod:<{width}}  {e.what}{detail}")
    return "\n".join(lines)
