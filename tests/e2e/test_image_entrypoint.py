"""What the image runs, run here as the image would: the Dockerfile's ENTRYPOINT + ``run sql``
as PID 1 of a new PID namespace, as the Dockerfile's numeric user, with its ENV, a read-only
root and an emptyDir at /tmp (tests/support/container.py). No docker daemon on the test
machine: the facts come from deploy/docker/Dockerfile itself.

Timing (tests/support/harness.py): G = 6 s, M = 2 s, D = 4 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.container import (
    Container,
    DockerfileFacts,
    namespace_processes,
    proc_status,
    require_containers,
)
from tests.support.harness import (
    DRAIN,
    GRACE,
    MARGIN,
    Env,
    Supervisor,
    children_of,
    spawn_logged,
    stopped_after,
    wait_until,
)
from tests.support.servers import free_port
from workerkit import exitcodes
from workerkit.engines.sql import upgrade

pytestmark = pytest.mark.e2e

APP = "tests.apps.pid1_jobs:app"


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def start_image(env: Env, facts: DockerfileFacts, *args: str) -> tuple[Supervisor, Container]:
    """ENTRYPOINT + ``args`` in a container: the image's ENV and the pod's settings only
    (nothing inherited from the test's environment), the data directory as a volume."""
    port = free_port()
    uid, gid = facts.uid_gid
    variables = {
        **facts.env(),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),  # the app, as its wheel would be
        "E2E_JOURNAL": str(env.journal),
        "WORKERKIT_DATABASE_URL": env.database_url,
        "WORKERKIT_POLL_INTERVAL": "0.1",
        "WORKERKIT_GRACE_PERIOD": str(GRACE),
        "WORKERKIT_RELEASE_MARGIN": str(MARGIN),
        "WORKERKIT_CHECKPOINT_INTERVAL": "1",
        "WORKERKIT_HTTP_PORT": str(port),
        "WORKERKIT_LOG_FORMAT": "json",
        "WORKERKIT_LOG_LEVEL": "debug",
    }
    container = Container(
        argv=[*facts.entrypoint, *args],
        env=variables,
        uid=uid,
        gid=gid,
        image_venv=facts.venv,
        volumes=[env.tmp],
        workdir=facts.workdir,
    )
    container.prepare()
    running = spawn_logged(container.host_argv(), env.tmp.parent, "image", port, variables)
    return running, container


def test_the_entrypoint_as_pid_1_and_uid_10001_reaps_orphans_and_drains_on_sigterm(
    tmp_path: Path,
) -> None:
    require_containers()
    facts = DockerfileFacts.load()
    uid, gid = facts.uid_gid
    data = tmp_path / "data"  # the volume: the queue and the journal, owned by the uid
    data.mkdir()
    env = Env(data, f"sqlite:///{data / 'queue.sqlite3'}", data / "journal.txt")
    upgrade(env.database_url)
    env.enqueue("orphan_waits", "o", job_id="o")
    env.enqueue("sleep", "a", 2.0, job_id="a")  # in hand at SIGTERM: shorter than D

    running, container = start_image(env, facts, "run", "sql", "--app", APP)
    with stopped_after(running):
        running.wait_ready()
        (pid1,) = wait_until(lambda: children_of(running.pid), timeout=10, what="PID 1")
        status = proc_status(pid1)
        assert status["NSpid"].split()[-1] == "1", status  # PID 1 of its own namespace
        assert running.wait_event("supervisor_starting")["pid"] == 1
        cmdline = Path(f"/proc/{pid1}/cmdline").read_bytes().split(b"\0")[1:-1]
        # The image's venv script found on the image's PATH, then exactly our arguments.
        assert [c.decode() for c in cmdline] == [
            f"{facts.venv}/bin/{facts.entrypoint[0]}",
            "run",
            "sql",
            "--app",
            APP,
        ]
        # Exactly the image's ENV and the pod's settings, nothing of the test's environment;
        # the supervisor's runtime directory in the image's TMPDIR (the emptyDir).
        assert environ_of(pid1) == container.env
        tmpdir = facts.env()["TMPDIR"]
        assert running.wait_event("channel_listening")["path"].startswith(f"{tmpdir}/")
        for pid, each in namespace_processes(pid1).items():  # the worker too
            assert each["Uid"].split() == [str(uid)] * 4, (pid, each)
            assert each["Gid"].split() == [str(gid)] * 4, (pid, each)
            assert int(each["CapEff"], 16) == 0, (pid, each)
            assert each["NoNewPrivs"] == "1", (pid, each)

        # An orphan: adopted by PID 1 (nothing in between), then reaped when it exits.
        line = wait_until(
            lambda: next((x for x in env.lines() if x.startswith("orphan o pid=")), None),
            timeout=15,
            what="the orphan to be adopted",
        )
        ns_pid, ppid = (int(part.split("=")[1]) for part in line.split()[2:4])
        assert ppid == 1, line
        (orphan,) = wait_until(
            lambda: [
                pid
                for pid, each in namespace_processes(pid1).items()
                if each["NSpid"].split()[-1] == str(ns_pid)
            ],
            timeout=5,
            what="the orphan among the container's processes",
        )
        assert proc_status(orphan)["PPid"] == str(pid1)
        Path(f"{env.journal}.release-o").touch()
        env.wait_line("orphan o exiting")
        wait_until(lambda: not proc_status(orphan), timeout=5, what="PID 1 to reap the orphan")
        zombies = [p for p, s in namespace_processes(pid1).items() if s["State"][0] == "Z"]
        assert zombies == []

        env.wait_line("start a 1")
        running.signal(15, pid=pid1)  # SIGTERM to PID 1 only, as the container runtime sends it
        code, elapsed = running.wait_exit(GRACE + 5)
    assert code == exitcodes.OK, running.log_text()
    assert elapsed < DRAIN, elapsed  # the job in hand finished inside the drain window
    lines = env.lines()
    for expected in ("start o 1", "done o", "orphan o exiting", "start a 1", "done a"):
        assert lines.count(expected) == 1, lines
    assert len(lines) == 6, lines  # the five above and the adoption: nothing ran twice
    for job_id in ("o", "a"):
        job = env.job(job_id)
        assert (job["state"], job["attempts"]) == ("succeeded", 1), job
    (stopped,) = running.events_named("supervisor_stopped")
    assert stopped["outcome"] == "clean", stopped
