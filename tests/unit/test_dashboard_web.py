"""The dashboard's pages and actions, served by a real uvicorn server (in a thread) over an
in-memory source that implements the contract (tests/support/dashboard_memory.py), spoken to
with http.client: pages with rows, pagination, fragments, confirmation, CSRF, fencing, 503.
"""

from __future__ import annotations

import dataclasses
import html
import http.client
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlencode

import pytest

from tests.support.dashboard_memory import MemoryDashboardSource, served
from tests.support.harness import wait_until
from workerkit.dashboard.app import create_app
from workerkit.dashboard.web import DashboardOptions
from workerkit.engines.presence import Presence
from workerkit.scheduler.contract import Schedule, SchedulerBinding
from workerkit.scheduler.triggers import Every
from workerkit.testing import InMemorySchedulerStore

pytestmark = pytest.mark.unit


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: str


@dataclass
class Client:
    """A browser without JavaScript: keeps cookies, follows nothing by itself."""

    host: str
    port: int
    cookies: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                **headers: str) -> Reply:  # fmt: skip
        conn = http.client.HTTPConnection(self.host, self.port, timeout=20)
        sent = {**self.headers, **headers}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        for raw in response.headers.get_all("set-cookie") or []:
            name, _, rest = raw.partition("=")
            value = rest.split(";")[0]
            if "max-age=0" in raw.lower() or value in ('""', ""):
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return Reply(response.status, response.headers, text)

    def get(self, path: str, **headers: str) -> Reply:
        return self.request("GET", path, **headers)

    def post(self, path: str, form: dict[str, str], **headers: str) -> Reply:
        return self.request("POST", path, form, **headers)


def hidden_fields(page: str, form_id: str | None = None) -> dict[str, str]:
    """The hidden inputs of the form ``form_id`` (or of the first form with hidden inputs)."""
    if form_id is not None:
        match = re.search(rf'<form id="{form_id}".*?</form>', page, re.S)
        assert match, f"no form #{form_id}"
        page = match.group(0)
    found = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)
    return {name: html.unescape(value) for name, value in found}


def action_form(page: str, action: str) -> tuple[str, dict[str, str]]:
    """The URL and hidden fields of the form whose button is ``data-action=action``."""
    for match in re.finditer(r'<form method="post" action="([^"]+)" class="action">(.*?)</form>',
                             page, re.S):  # fmt: skip
        if f'data-action="{action}"' in match.group(2):
            return html.unescape(match.group(1)), hidden_fields(match.group(2))
    raise AssertionError(f"no {action} button")


def presence(worker_id: str, *, heartbeat_at: float | None = None, state: str = "ready",
             **fields: object) -> Presence:  # fmt: skip
    """A worker's presence, published now unless ``heartbeat_at`` says when (ttl 10 min: live
    through any stall of a loaded machine)."""
    now = time.time()
    values: dict[str, object] = {
        "worker_id": worker_id, "hostname": "pod-a", "pid": 7, "engine": "memory",
        "queues": ("default",), "concurrency": 2, "state": state, "started_at": now - 300,
        "heartbeat_at": now if heartbeat_at is None else heartbeat_at, "ttl": 600.0,
    } | fields  # fmt: skip
    return Presence(**values)  # type: ignore[arg-type]


@pytest.fixture
def source() -> MemoryDashboardSource:
    now = time.time()
    src = MemoryDashboardSource()
    src.add("w1", task="tasks.send", enqueued_at=now - 30)
    src.add("s1", state="scheduled", run_at=now + 60)
    src.add("r1", state="running", queue="mail", attempt=1, worker="pod-a-1", run_at=now - 5,
            lease_expires_at=now + 25, checkpoint='{"page": 3}')  # fmt: skip
    src.add("f1", state="failed", attempt=3, finished_at=now - 10, args='[1, "<b>"]',
            error="Traceback (most recent call last):\nValueError: boom <x>")  # fmt: skip
    src.add("d1", state="finished", attempt=1, finished_at=now - 3, result="42")
    src.presences["pod-a-1"] = presence("pod-a-1", jobs=("r1",))
    src.presences["pod-b-1"] = presence("pod-b-1", state="draining", drain_deadline=now + 20,
                                        hard_deadline=now + 28)  # fmt: skip
    src.presences["pod-c-1"] = presence("pod-c-1", heartbeat_at=now - 3600)  # lost: ttl 600
    store = InMemorySchedulerStore()
    tick = Schedule("tick", "tasks.tick", Every(30.0), queue="default")
    lease = store.acquire("sched-pod-1", 15)
    assert lease is not None
    store.register(lease, [tick])
    src.binding = SchedulerBinding(store, (tick,))
    return src


@pytest.fixture
def client(source: MemoryDashboardSource) -> Iterator[Client]:
    with served(create_app(source, options=DashboardOptions(page_size=50))) as (host, port):
        yield Client(host, port)


def test_every_page_renders_with_rows(client: Client) -> None:
    overview = client.get("/")
    assert overview.status == 200
    assert '<table id="queues" data-refresh>' in overview.body
    assert '<tr data-queue="default" data-paused="false">' in overview.body
    for cell in ("waiting", "scheduled", "running", "failed", "finished", "oldest", "paused"):
        assert f'<td class="{cell}">' in overview.body
    assert '<svg class="chart"' in overview.body
    assert "3 workers" in overview.body
    assert "1 lost" in overview.body
    assert "1 schedule, 0 paused" in overview.body
    assert "leader: sched-pod-1" in overview.body

    for state, job_id in (("waiting", "w1"), ("scheduled", "s1"), ("running", "r1"),
                          ("failed", "f1"), ("finished", "d1")):  # fmt: skip
        page = client.get(f"/jobs?state={state}")
        assert page.status == 200
        assert f'<tr data-job-id="{job_id}" data-state="{state}">' in page.body
    failed = client.get("/jobs/f1")
    assert failed.status == 200
    assert '<section id="job" data-state="failed"' in failed.body
    assert "ValueError: boom &lt;x&gt;" in failed.body  # escaped, whole
    assert "[1, &#34;&lt;b&gt;&#34;]" in failed.body
    assert 'data-action="retry"' in failed.body
    assert 'data-action="discard"' in failed.body
    assert 'data-action="cancel"' not in failed.body
    running = client.get("/jobs/r1").body
    assert "{&#34;page&#34;: 3}" in running
    assert "pod-a-1" in running
    assert 'data-action="cancel"' in client.get("/jobs/w1").body

    workers = client.get("/workers").body
    assert '<tr data-worker-id="pod-b-1" data-state="draining">' in workers
    assert re.search(r'data-worker-id="pod-b-1".*?<td class="deadline">.*?in 2\d s', workers, re.S)
    assert '<tr data-worker-id="pod-c-1" data-state="lost">' in workers
    assert '<td class="state state-lost">lost</td>' in workers
    assert '<a href="/jobs/r1">r1</a>' in workers

    schedules = client.get("/schedules").body
    assert '<tr data-schedule="tick" data-status="active">' in schedules
    assert "sched-pod-1" in schedules
    assert 'data-action="trigger"' in schedules

    found = client.get("/search?q=tasks.send").body
    assert '<tr data-job-id="w1" data-state="waiting">' in found
    assert client.get("/healthz").body == "ok"


def test_no_page_loads_anything_from_another_host(client: Client) -> None:
    for path in ("/", "/jobs", "/jobs/f1", "/workers", "/schedules", "/search?q=x"):
        page = client.get(path)
        assert not re.search(r'(src|href|action)="(https?:)?//', page.body), path
        assert "default-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/static/refresh.js")
    assert script.status == 200
    assert "fragment" in script.body
    assert client.get("/static/style.css").status == 200


def test_pagination_follows_the_keyset_cursors(source: MemoryDashboardSource) -> None:
    for n in range(120):
        source.add(f"bulk-{n:03}", queue="bulk", enqueued_at=time.time() - 1000 + n)
    seen: list[str] = []
    with served(create_app(source, options=DashboardOptions(page_size=50))) as (host, port):
        client = Client(host, port)
        url: str | None = "/jobs?state=waiting&queue=bulk"
        pages = 0
        while url:
            page = client.get(url)
            assert page.status == 200
            pages += 1
            seen += re.findall(r'<tr data-job-id="([^"]+)"', page.body)
            link = re.search(r'<a id="next-page" rel="next" href="([^"]+)"', page.body)
            url = html.unescape(link.group(1)) if link else None
    assert pages == 3
    assert seen == [f"bulk-{n:03}" for n in range(120)]


def test_a_fragment_is_only_that_element(client: Client) -> None:
    for path, element in (("/?fragment=queues", '<table id="queues"'),
                          ("/jobs?state=failed&fragment=jobs", '<table id="jobs"'),
                          ("/jobs/f1?fragment=job", '<section id="job"'),
                          ("/workers?fragment=workers", '<table id="workers"'),
                          ("/schedules?fragment=schedules", '<table id="schedules"'),
                          ("/?fragment=worker_summary", '<section id="worker_summary"'),
                          ):  # fmt: skip
        reply = client.get(path)
        assert reply.status == 200, path
        assert reply.body.strip().startswith(element), path
        assert "<html" not in reply.body
    assert client.get("/?fragment=nope").status == 404
    assert client.get("/?fragment=content").status == 200  # a block, but not refreshed
    page = client.get("/")
    assert 'data-refresh-interval="2.0"' in page.body


def test_an_action_without_the_csrf_token_is_refused(
    client: Client, source: MemoryDashboardSource
) -> None:
    version = source.jobs_by_id["f1"].version
    client.get("/jobs/f1")  # the session's CSRF cookie
    form = {"version": version, "confirm": "yes"}
    assert client.post("/actions/jobs/f1/retry", form).status == 403
    assert client.post("/actions/jobs/f1/retry", {**form, "csrf": "forged"}).status == 403
    token = client.cookies["workerkit_dashboard_csrf"]
    other_site = client.post(
        "/actions/jobs/f1/retry", {**form, "csrf": token}, Origin="http://evil.example"
    )
    assert other_site.status == 403
    assert source.jobs_by_id["f1"].state == "failed"
    stranger = Client(client.host, client.port)  # no cookie: a cross-site form post
    assert stranger.post("/actions/jobs/f1/retry", {**form, "csrf": token}).status == 403


def test_an_action_is_confirmed_then_done_and_logged_once(
    client: Client, source: MemoryDashboardSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit.dashboard")
    page = client.get("/jobs/f1")
    url, fields = action_form(page.body, "retry")
    assert url == "/actions/jobs/f1/retry"
    confirm = client.post(url, fields, Origin=f"http://{client.host}:{client.port}")
    assert confirm.status == 200
    assert '<form id="confirm" method="post" action="/actions/jobs/f1/retry">' in confirm.body
    assert '<button type="submit" id="confirm-button">' in confirm.body
    assert source.jobs_by_id["f1"].state == "failed"  # nothing done yet
    done = client.post(url, hidden_fields(confirm.body, "confirm"))
    assert done.status == 303
    assert done.headers["location"] == "/jobs/f1"
    assert source.jobs_by_id["f1"].state == "waiting"
    after = client.get("/jobs/f1")
    assert '<div id="flash" class="ok" role="status">job f1 retried' in after.body
    assert 'id="flash"' not in client.get("/jobs/f1").body  # shown once
    lines = [r for r in caplog.records if getattr(r, "event", "") == "dashboard_action"]
    assert [(r.action, r.job_id, r.actor, r.outcome) for r in lines] == [  # type: ignore[attr-defined]
        ("retry", "f1", "local", "done")
    ]


def test_a_stale_action_answers_409_and_changes_nothing(
    client: Client, source: MemoryDashboardSource
) -> None:
    page = client.get("/jobs/w1")
    url, fields = action_form(page.body, "cancel")
    confirm = client.post(url, fields)
    source.change("w1", state="running", worker="pod-a-1")  # a worker took it meanwhile
    stale = client.post(url, hidden_fields(confirm.body, "confirm"))
    assert stale.status == 409
    assert '<div id="flash" class="error" role="status">job w1 changed since' in stale.body
    assert "nothing done" in stale.body
    assert '<section id="job" data-state="running"' in stale.body  # the job as it is now
    assert source.jobs_by_id["w1"].state == "running"


def test_unknown_jobs_and_refused_actions(client: Client, source: MemoryDashboardSource) -> None:
    client.get("/")
    csrf = client.cookies["workerkit_dashboard_csrf"]
    assert client.get("/jobs/nope").status == 404
    assert client.get("/jobs?state=lost").status == 400
    missing = client.post("/actions/jobs/nope/retry", {"csrf": csrf, "version": "x"})
    assert missing.status == 404
    gone = client.post("/actions/jobs/nope/retry", {"csrf": csrf, "version": "x", "confirm": "yes"})
    assert gone.status == 404
    assert "no job" in gone.body
    no_queue = client.post("/actions/queues/nope/pause", {"csrf": csrf, "confirm": "yes"})
    assert no_queue.status == 400
    assert "no queue" in html.unescape(no_queue.body)
    assert client.post("/actions/jobs/f1/explode", {"csrf": csrf}).status == 404


def test_queue_pause_and_resume(client: Client, source: MemoryDashboardSource) -> None:
    page = client.get("/")
    url, fields = action_form(page.body, "pause")
    assert url == "/actions/queues/default/pause"
    confirm = client.post(url, fields)
    assert "Pause queue default" in confirm.body
    assert client.post(url, hidden_fields(confirm.body, "confirm")).status == 303
    assert source.paused == {"default"}
    page = client.get("/")
    assert '<tr data-queue="default" data-paused="true">' in page.body
    assert 'id="flash" class="ok"' in page.body
    url, fields = action_form(page.body, "resume")
    confirm = client.post(url, fields)
    client.post(url, hidden_fields(confirm.body, "confirm"))
    assert source.paused == set()


def test_schedule_actions_reach_the_scheduler_store(
    client: Client, source: MemoryDashboardSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit.dashboard")
    assert source.binding is not None
    store = source.binding.store
    page = client.get("/schedules")
    for action in ("pause", "trigger"):
        url, fields = action_form(page.body, action)
        confirm = client.post(url, fields)
        assert client.post(url, hidden_fields(confirm.body, "confirm")).status == 303
    state = store.states(None)["tick"]
    assert state.paused
    assert len(state.triggers) == 1
    page = client.get("/schedules")
    assert 'data-schedule="tick" data-status="paused"' in page.body
    assert 'data-action="resume"' in page.body
    csrf = client.cookies["workerkit_dashboard_csrf"]
    unknown = client.post("/actions/schedules/nope/pause", {"csrf": csrf, "confirm": "yes"})
    assert unknown.status == 404
    lines = [r for r in caplog.records if getattr(r, "event", "") == "dashboard_action"]
    assert [(r.action, r.schedule, r.outcome) for r in lines] == [  # type: ignore[attr-defined]
        ("pause", "tick", "done"),
        ("trigger", "tick", "done"),
        ("pause", "nope", "refused"),
    ]


def test_an_unreachable_store_answers_503_and_the_dashboard_recovers(
    client: Client, source: MemoryDashboardSource
) -> None:
    source.down = True
    for path in ("/", "/jobs", "/jobs/f1", "/workers", "/search?q=f1", "/?fragment=queues"):
        reply = client.get(path)
        assert reply.status == 503, path
        assert "The store is unreachable" in reply.body
    client.get("/")
    csrf = client.cookies["workerkit_dashboard_csrf"]
    act = client.post("/actions/queues/default/pause", {"csrf": csrf, "confirm": "yes"})
    assert act.status == 503
    source.down = False
    assert client.get("/").status == 200


def test_the_confirmation_and_redirect_stay_on_this_site(
    client: Client, source: MemoryDashboardSource
) -> None:
    client.get("/")
    csrf = client.cookies["workerkit_dashboard_csrf"]
    form = {"csrf": csrf, "confirm": "yes", "back": "//evil.example/x"}
    reply = client.post("/actions/queues/default/pause", form)
    assert reply.status == 303
    assert reply.headers["location"] == "/"


def test_json_of_the_presence_counts_is_not_needed_for_pages(source: MemoryDashboardSource) -> None:
    # A presence straight from its JSON (as a store returns it) renders as well.
    raw = presence("pod-z-1", counts={"default": {"succeeded": 2}}).to_json()
    source.presences = {"pod-z-1": Presence.from_json(json.loads(json.dumps(raw)))}
    with served(create_app(source)) as (host, port):
        assert 'data-worker-id="pod-z-1"' in Client(host, port).get("/workers").body


def test_the_background_sampler_feeds_the_overview_chart(source: MemoryDashboardSource) -> None:
    app = create_app(source, options=DashboardOptions(sample_interval=0.05))
    history = app.state.dashboard.history
    worker = source.presences["pod-a-1"]
    with served(app) as (host, port):
        client = Client(host, port)

        def chart() -> str:
            page = client.get("/?fragment=queues").body
            match = re.search(r'<tr data-queue="default".*?(<svg.*?</svg>)', page, re.S)
            assert match
            return match.group(1)

        # The first sample is the baseline: what workers had done before is not this minute's.
        wait_until(lambda: history.sampled_at is not None, timeout=20, what="a first sample")
        assert 'data-succeeded="0" data-failed="0"' in chart()
        counts = {"default": {"succeeded": 4, "failed": 1, "released": 3}}
        source.presences["pod-a-1"] = dataclasses.replace(worker, counts=counts)
        wait_until(lambda: 'data-succeeded="4" data-failed="1"' in chart(), timeout=20,
                   what="the chart to show the new outcomes")  # fmt: skip


def test_a_page_under_another_host_name_is_refused(source: MemoryDashboardSource) -> None:
    """DNS rebinding: a page of attacker.example whose name now resolves to 127.0.0.1 reaches
    the open loopback dashboard under its own name, so its Origin matches its Host. The Host
    check refuses it before any cookie is set or anything is done."""
    version = source.jobs_by_id["f1"].version
    with served(create_app(source)) as (host, port):
        attacker = Client(host, port, headers={"Host": f"attacker.example:{port}"})
        page = attacker.get("/jobs/f1")
        assert page.status == 400
        assert "--allowed-host" in page.body
        assert attacker.cookies == {}  # no CSRF cookie for that page's script to echo
        attacker.cookies["workerkit_dashboard_csrf"] = "chosen-by-the-attacker"
        form = {"csrf": "chosen-by-the-attacker", "version": version, "confirm": "yes"}
        origin = f"http://attacker.example:{port}"
        assert attacker.post("/actions/jobs/f1/discard", form, Origin=origin).status == 400
        assert source.jobs_by_id["f1"].state == "failed"  # still there
        for name in ("localhost", "127.0.0.1", "[::1]", "LocalHost"):
            assert Client(host, port, headers={"Host": f"{name}:{port}"}).get("/").status == 200
        assert Client(host, port, headers={"Host": "localhost.evil.example"}).get("/").status == 400
        probe = Client(host, port, headers={"Host": f"10.42.0.7:{port}"})  # kubelet: the pod IP
        assert probe.get("/healthz").status == 200
        assert probe.get("/").status == 400


def test_allowed_host_names_are_served(source: MemoryDashboardSource) -> None:
    options = DashboardOptions(allowed_hosts=("jobs.example.com", "*.ops.example"))
    with served(create_app(source, options=options)) as (host, port):
        for name, status in (("jobs.example.com", 200), ("JOBS.example.com:443", 200),
                             ("eu.ops.example", 200), ("ops.example", 400),
                             ("jobs.example.com.evil.example", 400)):  # fmt: skip
            assert Client(host, port, headers={"Host": name}).get("/").status == status, name
