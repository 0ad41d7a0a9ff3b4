"""A rendered Deployment's pod, run here as the kubelet would run it (no cluster needed).

:meth:`Pod.from_deployment` reads the pod template the chart rendered: the container's
``command``/``args`` over the image's ENTRYPOINT/CMD (tests/support/container.py reads those
from the Dockerfile), its ``env`` (``secretKeyRef`` resolved from the secrets the test supplies),
the uid/gid of its securityContext, ``readOnlyRootFilesystem``, its emptyDir mounts, the
probes, ``lifecycle.preStop.sleep`` and ``terminationGracePeriodSeconds``. :meth:`Pod.start`
runs the container as PID 1 of a new PID namespace (the host's network: the probes answer on
127.0.0.1); :meth:`Pod.wait_started` probes as the kubelet does; :meth:`Pod.terminate` does what
the kubelet does on a pod's deletion: the preStop hook, SIGTERM to PID 1, SIGKILL when the grace
period, counted from the start of the termination, is spent.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.container import Container, DockerfileFacts, proc_status
from tests.support.harness import Supervisor, children_of, spawn_logged, try_http_get, wait_until

__all__ = ("Pod", "PodSpecError", "Probe", "Termination")

POLL = 0.05


class PodSpecError(ValueError):
    """The rendered pod asks for something the kubelet here does not do (or would refuse)."""


@dataclass(frozen=True)
class Probe:
    """An ``httpGet`` probe, its port resolved to a number."""

    path: str
    port: int
    period: float
    failure_threshold: int
    initial_delay: float
    timeout: float

    @property
    def budget(self) -> float:
        """How long the kubelet lets it fail before it acts (restart, or never ready)."""
        return self.initial_delay + self.period * self.failure_threshold

    @classmethod
    def parse(cls, spec: Mapping[str, Any], ports: Mapping[str, int]) -> Probe:
        get = spec.get("httpGet")
        if not isinstance(get, Mapping):
            raise PodSpecError(f"only httpGet probes are run here, not {sorted(spec)}")
        port = get["port"]
        return cls(
            path=str(get["path"]),
            port=ports[port] if isinstance(port, str) else int(port),
            period=float(spec.get("periodSeconds", 10)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
            initial_delay=float(spec.get("initialDelaySeconds", 0)),
            timeout=float(spec.get("timeoutSeconds", 1)),
        )


@dataclass(frozen=True)
class Termination:
    """What the kubelet saw terminating a pod; times in seconds from the start of it."""

    grace: float
    prestop: float  # the preStop sleep
    sigterm_at: float
    exited_at: float
    killed: bool  # SIGKILL at the grace period: the pod did not exit by itself
    exit_code: int | None
    #: The readinessProbe's answer right after SIGTERM (None: no probe, or no answer).
    readiness_after_sigterm: tuple[int, str] | None = None


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` references to earlier variables (``$$`` escapes)."""
    return re.sub(
        r"\$\$|\$\((\w+)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def _resolve_env(
    container: Mapping[str, Any], image_env: Mapping[str, str], secrets: Mapping[str, Any]
) -> dict[str, str]:
    """The container's environment: the image's, then envFrom, then env, as the kubelet
    builds it (later wins; ``$(VAR)`` expanded from the pod's own variables only: Kubernetes
    does not know the image's)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("secretRef")
        if ref is None:
            raise PodSpecError(f"envFrom {source}: only secretRef is supported here")
        prefix = source.get("prefix", "")
        env.update({f"{prefix}{k}": v for k, v in secrets[ref["name"]].items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = _expand(str(item["value"]), env)
            continue
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            raise PodSpecError(f"env {name}: only value and secretKeyRef are supported here")
        try:
            env[name] = secrets[ref["name"]][ref["key"]]
        except KeyError:
            if not ref.get("optional"):
                raise PodSpecError(
                    f"env {name}: secret {ref['name']!r} has no key {ref['key']!r}"
                ) from None
    return {**image_env, **env}


@dataclass
class Pod:
    """One pod of a rendered Deployment, run here: see the module's docstring."""

    name: str
    container: Container
    grace: float
    prestop: float
    startup: Probe | None
    readiness: Probe | None
    liveness: Probe | None
    workdir: Path
    port: int
    running: Supervisor | None = None
    started_at: float = 0.0
    _pid1: int | None = field(default=None, repr=False)

    @classmethod
    def from_deployment(
        cls,
        deployment: Mapping[str, Any],
        *,
        secrets: Mapping[str, Mapping[str, str]],
        image: DockerfileFacts,
        workdir: Path,
        volumes: Sequence[Path] = (),
        name: str = "pod",
        container_name: str | None = None,
    ) -> Pod:
        """The pod of ``deployment``, a rendered object with a pod template (a Deployment, or
        a Job). ``volumes``: host directories the test shares with the pod (its journal),
        writable by the pod's user at their path."""
        spec = deployment["spec"]["template"]["spec"]
        containers = spec["containers"]
        if container_name is not None:
            containers = [c for c in containers if c["name"] == container_name]
        container = containers[0]
        pod_security = spec.get("securityContext") or {}
        security = {**pod_security, **(container.get("securityContext") or {})}
        image_uid, image_gid = image.uid_gid
        uid = int(security.get("runAsUser", image_uid))
        gid = int(security.get("runAsGroup", image_gid))
        if security.get("runAsNonRoot") and uid == 0:
            raise PodSpecError("runAsNonRoot with uid 0: the kubelet refuses to start it")
        if "command" in container:
            argv = [*container["command"], *container.get("args", [])]
        else:
            argv = [*image.entrypoint, *container.get("args", image.cmd)]
        empty = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
        mounts = container.get("volumeMounts") or []
        if any(m["name"] not in empty for m in mounts):
            raise PodSpecError(f"only emptyDir volumes are mounted here: {mounts}")
        ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports") or []}
        prestop = (container.get("lifecycle") or {}).get("preStop")
        if prestop is not None and set(prestop) != {"sleep"}:
            raise PodSpecError(f"preStop {prestop}: only the sleep action (no shell) is run here")

        def probe(kind: str) -> Probe | None:
            found = container.get(kind)
            return Probe.parse(found, ports) if found else None

        return cls(
            name=name,
            container=Container(
                argv=argv,
                env=_resolve_env(container, image.env(), secrets),
                uid=uid,
                gid=gid,
                image_venv=image.venv,
                volumes=list(volumes),
                read_only_root=bool(security.get("readOnlyRootFilesystem", False)),
                empty_dirs=[m["mountPath"] for m in mounts],
                workdir=container.get("workingDir", image.workdir),
            ),
            grace=float(spec.get("terminationGracePeriodSeconds", 30)),
            prestop=float(prestop["sleep"]["seconds"]) if prestop else 0.0,
            startup=probe("startupProbe"),
            readiness=probe("readinessProbe"),
            liveness=probe("livenessProbe"),
            workdir=workdir,
            port=ports.get("http", 0),
        )

    # ----------------------------------------------------------------------------------------

    def start(self) -> Pod:
        self.container.prepare()
        self.started_at = time.monotonic()
        self.running = spawn_logged(
            self.container.host_argv(),
            self.workdir,
            self.name,
            self.port,
            dict(self.container.env),
        )
        return self

    @property
    def log(self) -> Supervisor:
        """The pod's log (its JSON events), as the harness reads a supervisor's."""
        assert self.running is not None, "the pod was not started"
        return self.running

    @property
    def pid1(self) -> int:
        """The host pid of the container's PID 1."""
        if self._pid1 is None:
            (self._pid1,) = wait_until(
                lambda: children_of(self.log.pid), timeout=10, what=f"{self.name}'s PID 1"
            )
        return self._pid1

    def status(self) -> dict[str, str]:
        return proc_status(self.pid1)

    def _probe_until_ok(self, probe: Probe, budget: float, what: str) -> float:
        """Probe until 200 (more often than its period: the kubelet's first success can only
        be later); fail when the kubelet would have given up. Seconds since the start."""
        deadline = time.monotonic() + budget
        while True:
            if self.log.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.log.proc.returncode} before {what}:\n"
                    f"{self.log.log_text()}"
                )
            answer = try_http_get(probe.port, probe.path)
            if answer is not None and answer[0] == 200:
                return time.monotonic() - self.started_at
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name}: {probe.path} not 200 within {budget:g}s ({what}); last "
                    f"answer {answer}:\n{self.log.log_text()}"
                )
            time.sleep(POLL)

    def wait_started(self, ready_within: float = 30.0) -> tuple[float, float]:
        """Started (the startupProbe within its failure budget), then ready (the
        readinessProbe). Seconds from the start to each."""
        started = ready = 0.0
        if self.startup is not None:
            started = self._probe_until_ok(self.startup, self.startup.budget, "started")
        if self.readiness is not None:
            ready = self._probe_until_ok(self.readiness, ready_within, "ready")
        if self.liveness is not None:
            answer = try_http_get(self.liveness.port, self.liveness.path)
            assert answer is not None, f"{self.name}: {self.liveness.path} unanswered"
            assert answer[0] == 200, answer
        return started, ready

    def terminate(self) -> Termination:
        """The pod's deletion: the preStop sleep, SIGTERM to PID 1, SIGKILL at the grace
        period (from the start of the termination) if it is still running."""
        proc = self.log.proc
        pid1 = self.pid1
        begun = time.monotonic()
        if self.prestop:
            time.sleep(self.prestop)  # the kubelet's sleep action: nothing else happens
        sigterm_at = time.monotonic() - begun
        self.log.signalled_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid1, signal.SIGTERM)
        readiness = None
        if self.readiness is not None:
            readiness = try_http_get(self.readiness.port, self.readiness.path)
        killed = False
        while proc.poll() is None:
            if time.monotonic() - begun >= self.grace:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid1, signal.SIGKILL)  # PID 1 dies: the namespace with it
                killed = True
                proc.wait(10)
                break
            time.sleep(0.01)
        return Termination(
            grace=self.grace,
            prestop=self.prestop,
            sigterm_at=sigterm_at,
            exited_at=time.monotonic() - begun,
            killed=killed,
            exit_code=proc.returncode,
            readiness_after_sigterm=readiness,
        )

    def run_to_completion(self, timeout: float) -> int:
        """A Job's pod (``restartPolicy: Never``): start it, wait for its exit, its code."""
        proc = self.start().log.proc
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:g}s:\n{self.log.log_text()}"
            ) from None

    def stop(self) -> None:
        """Kill what is left of the pod (a test failed half-way)."""
        if self.running is not None:
            self.running.stop()
