"""docs/tutorials/wrap-celery.md, run top to bottom against a real redis-server: every file
saved, every command run, every line the page shows seen, Ctrl-C pressed where the page presses
it; and what the prose claims (the task back in its queue at once, resumed where it stopped).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tests.docs.tutorial import Tutorial, resumed_at, stopped_at
from tests.support.servers import free_port

if TYPE_CHECKING:
    import redis


def test_wrap_your_celery_worker(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    tutorial = Tutorial.prepare(
        "docs/tutorials/wrap-celery.md",
        tmp_path,
        WORKERKIT_REDIS_URL=redis_url,
        WORKERKIT_HTTP_PORT=str(free_port()),
    )
    files: list[str] = []
    runs: list[list[str]] = []
    queued_after_first_run = -1
    for _, step in tutorial.steps():
        if isinstance(step, str):
            files.append(step)
            continue
        lines = tutorial.run(step)
        if step.line == "workerkit run celery":
            runs.append(lines)
            if len(runs) == 1:
                queued_after_first_run = redis_client.llen("celery")

    assert files == ["tasks.py", "send.py", "workerkit.toml"]
    assert len(runs) == 2
    # "went back to its queue at once, with its checkpoint"
    assert queued_after_first_run == 1
    assert stopped_at(runs[0]) > 3
    assert resumed_at(runs[1]) == [stopped_at(runs[0])]
    assert redis_client.llen("celery") == 0
