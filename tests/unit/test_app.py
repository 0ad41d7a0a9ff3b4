"""workerkit.app: registering tasks, and what an enqueue puts on the queue (in memory here)."""

from __future__ import annotations

import json
import time

import pytest

from workerkit.app import App, EnqueueOptions, decode_payload, encode_payload
from workerkit.errors import ConfigurationError, PayloadError, PayloadTooLarge, UnknownTask
from workerkit.testing import InMemoryQueue


def queued(app: App, job_id: str) -> dict[str, object]:
    job = app.backend.get_job(job_id)  # type: ignore[attr-defined]
    assert job is not None, job_id
    return dict(job)


def test_a_task_is_named_after_its_function_and_runs_here_when_called() -> None:
    app = App(backend=InMemoryQueue())

    @app.task
    def add(a: int, b: int) -> int:
        """Adds."""
        return a + b

    assert add.name == f"{__name__}.{add.fn.__qualname__}"
    assert app.tasks[add.name] is add
    assert (add(2, 3), add.__doc__) == (5, "Adds.")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
        ({"timeout": 0}, "timeout must be above 0 seconds"),
    ],
)
def test_impossible_task_options_are_refused(options: dict[str, float], message: str) -> None:
    app = App(backend=InMemoryQueue())
    with pytest.raises(ConfigurationError, match=message):
        app.task(name="t", **options)(lambda: None)  # type: ignore[call-overload]


def test_a_task_name_is_registered_once() -> None:
    app = App(backend=InMemoryQueue())
    app.task(name="t")(lambda: None)
    with pytest.raises(ConfigurationError, match="registered twice"):
        app.task(name="t")(lambda: None)


def test_enqueue_uses_the_tasks_queue_and_attempts_and_the_options_of_the_call() -> None:
    app = App(backend=InMemoryQueue())

    @app.task(name="send", queue="emails", max_attempts=5)
    def send(to: str) -> None:
        del to

    first = queued(app, send.enqueue("a@example.com"))
    assert (first["task"], first["queue"], first["max_attempts"]) == ("send", "emails", 5)
    assert json.loads(str(first["payload"])) == {"args": ["a@example.com"], "kwargs": {}}

    before = time.time()
    job_id = send.configure(queue="urgent", delay=60, job_id="once").enqueue(to="b@example.com")
    assert job_id == "once"
    second = queued(app, "once")
    assert second["queue"] == "urgent"
    assert float(str(second["run_at"])) >= before + 60
    # The same job id again: nothing new, the same id back.
    assert send.configure(job_id="once").enqueue("c@example.com") == "once"
    assert json.loads(str(queued(app, "once")["payload"]))["kwargs"] == {"to": "b@example.com"}


def test_enqueue_by_name_needs_no_registered_task() -> None:
    app = App(backend=InMemoryQueue())
    job_id = app.enqueue("elsewhere.task", [1], {}, EnqueueOptions(queue="q"))
    assert (queued(app, job_id)["task"], queued(app, job_id)["queue"]) == ("elsewhere.task", "q")


def test_delay_and_run_at_together_are_refused() -> None:
    app = App(backend=InMemoryQueue())
    task = app.task(name="t")(lambda: None)
    with pytest.raises(ConfigurationError, match="delay or run_at, not both"):
        task.configure(delay=1, run_at=time.time())


def test_payloads_round_trip_and_refuse_what_is_not_json_or_too_large() -> None:
    text = encode_payload("t", (1, "a"), {"k": [True, None]}, cap=1000)
    assert decode_payload(text) == ([1, "a"], {"k": [True, None]})
    with pytest.raises(PayloadError, match="arguments must be JSON"):
        encode_payload("t", (object(),), {}, cap=1000)
    with pytest.raises(PayloadTooLarge, match="over max_payload_bytes=10"):
        encode_payload("t", ("x" * 20,), {}, cap=10)
    for bad in ("not json", "[1]", '{"args": {}}'):
        with pytest.raises(PayloadError):
            decode_payload(bad)


def _nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


def test_an_argument_nested_too_deeply_is_a_payload_error_at_enqueue() -> None:
    queue = InMemoryQueue()
    app = App(backend=queue)
    task = app.task(name="t")(lambda value: None)
    with pytest.raises(PayloadError, match="nested too deeply to encode") as caught:
        task.enqueue(_nested(100_000))
    assert "'t'" in str(caught.value)
    with pytest.raises(PayloadError, match="nested too deeply"):
        app.enqueue("t", [], {"value": _nested(100_000)})
    assert queue.stats(["default"]).depth == {"default": 0}


def test_a_payload_nested_too_deeply_is_a_payload_error_at_decode() -> None:
    deep = '{"args":[' + "[" * 100_000 + "]" * 100_000 + '],"kwargs":{}}'
    with pytest.raises(PayloadError, match="nested too deeply to decode"):
        decode_payload(deep)


def test_get_task_names_the_closest_tasks_or_lists_them() -> None:
    app = App(backend=InMemoryQueue())
    send = app.task(name="emails.send")(lambda to: None)
    app.task(name="emails.bounce")(lambda to: None)
    assert app.get_task("emails.send") is send
    with pytest.raises(UnknownTask, match=r"no task 'emails.sned'.*did you mean 'emails.send'"):
        app.get_task("emails.sned")
    with pytest.raises(UnknownTask, match=r"its tasks: emails.bounce, emails.send$"):
        app.get_task("zzz")
    with pytest.raises(UnknownTask, match=r"its tasks: none$"):
        App(backend=InMemoryQueue()).get_task("t")


def test_retry_delays_grow_with_jitter_up_to_the_cap() -> None:
    app = App(backend=InMemoryQueue())
    task = app.task(name="t", retry_backoff=2.0, retry_backoff_max=10.0)(lambda: None)
    for attempt, step in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)]:
        for _ in range(20):
            assert step / 2 <= task.retry_delay(attempt) <= step


# --- periodic jobs (App.periodic / App.schedule) -------------------------------------------


def test_periodic_declares_a_schedule_of_the_task_with_its_queue_and_attempts() -> None:
    app = App(backend=InMemoryQueue())

    @app.periodic("nightly", cron="0 3 * * *", timezone="Europe/Berlin", kwargs={"full": True})
    @app.task(name="report", queue="reports", max_attempts=5)
    def report(full: bool = False) -> None: ...

    schedule = app.schedules["nightly"]
    assert (schedule.task, schedule.queue, dict(schedule.kwargs)) == (
        "report",
        "reports",
        {"full": True},
    )
    assert schedule.options == {"max_attempts": 5}
    assert schedule.trigger.describe() == "cron '0 3 * * *' Europe/Berlin"
    assert report.name == "report"  # the task comes back unchanged
    every = app.schedule("often", "report", every=10, misfire="all", max_catch_up=3)
    assert (every.misfire, every.max_catch_up, every.trigger.next_after(10.0)) == ("all", 3, 20.0)
    assert set(app.schedules) == {"nightly", "often"}


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ({}, "exactly one of cron"),
        ({"cron": "* * * * *", "every": 5}, "exactly one of cron"),
        ({"cron": "61 * * * *"}, "'61 \\* \\* \\* \\*' is not a valid cron"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone='Mars/Olympus'"),
        ({"every": 5, "timezone": "UTC"}, "timezone= applies to cron="),
        ({"every": 0}, "every=0"),
        ({"every": 5, "misfire": "some"}, "misfire='some' .*give one of skip, latest, all"),
        ({"every": 5, "max_catch_up": 0}, "max_catch_up=0"),
        ({"every": 5, "misfire_grace": -1}, "misfire_grace=-1"),
        ({"every": 5, "args": [object()]}, "args and kwargs must be JSON"),
    ],
)
def test_a_bad_schedule_is_refused_where_it_is_declared(
    declaration: dict[str, object], message: str
) -> None:
    app = App(backend=InMemoryQueue())
    app.task(name="t")(lambda *a: None)
    with pytest.raises(ConfigurationError, match=message) as refused:
        app.schedule("every-x", "t", **declaration)  # type: ignore[arg-type]
    assert "schedule 'every-x'" in str(refused.value)
    assert app.schedules == {}


def test_a_schedule_name_is_declared_once_and_names_a_registered_task() -> None:
    app = App(backend=InMemoryQueue())
    task = app.task(name="t")(lambda: None)
    app.schedule("s", task, every=5)
    with pytest.raises(ConfigurationError, match="'s' is declared twice"):
        app.schedule("s", task, every=6)
    with pytest.raises(UnknownTask, match="no task 'nope'"):
        app.schedule("other", "nope", every=5)
    with pytest.raises(ConfigurationError, match=r"goes above @app\.task"):
        app.periodic("p", every=5)(lambda: None)  # type: ignore[arg-type]


def test_a_scheduled_payload_gives_the_job_context_its_schedule_and_fire_time() -> None:
    from workerkit.job import JobContext

    payload = encode_payload("t", [1], {}, 1000, fired_by=("tick", 1800000000.5))
    context = JobContext(job_id="j", task="t", queue="q", attempt=1)
    assert decode_payload(payload, into=context) == ([1], {})
    assert (context.schedule, context.fire_time) == ("tick", 1800000000.5)
    plain = JobContext(job_id="j", task="t", queue="q", attempt=1)
    decode_payload(encode_payload("t", [1], {}, 1000), into=plain)
    assert (plain.schedule, plain.fire_time) == (None, None)
    with pytest.raises(PayloadError, match="'fire_time' a number"):
        decode_payload('{"args":[],"kwargs":{},"schedule":"tick"}', into=plain)


def test_every_fires_on_its_anchors_grid() -> None:
    app = App(backend=InMemoryQueue())
    task = app.task(name="t")(lambda: None)
    schedule = app.schedule("s", task, every=10, anchor=3)
    assert schedule.trigger.next_after(10.0) == 13.0
    with pytest.raises(ConfigurationError, match="anchor= applies to every="):
        app.schedule("c", task, cron="* * * * *", anchor=3)
