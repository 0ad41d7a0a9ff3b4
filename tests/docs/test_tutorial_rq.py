"""docs/tutorials/wrap-rq.md, run top to bottom against a real redis-server: every file saved,
every command run, every line the page shows seen, Ctrl-C pressed where the page presses it; and
what the prose claims (the released job back at the front of its queue, resumed where it
stopped, its attempt given back).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tests.docs.tutorial import Tutorial, resumed_at, stopped_at
from tests.support.servers import free_port

if TYPE_CHECKING:
    import redis


def test_wrap_your_rq_worker(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    tutorial = Tutorial.prepare(
        "docs/tutorials/wrap-rq.md",
        tmp_path,
        WORKERKIT_REDIS_URL=redis_url,
        WORKERKIT_HTTP_PORT=str(free_port()),
    )
    files: list[str] = []
    runs: list[list[str]] = []
    front_after_first_run: list[bytes] = []
    for _, step in tutorial.steps():
        if isinstance(step, str):
            files.append(step)
            continue
        lines = tutorial.run(step)
        if step.line == "workerkit run rq":
            runs.append(lines)
            if len(runs) == 1:
                front_after_first_run = redis_client.lrange("rq:queue:default", 0, 0)

    assert files == ["jobs.py", "enqueue.py", "rq_app.py", "workerkit.toml"]
    assert len(runs) == 2
    # "it is back at the front of default, with its checkpoint"
    released = [line for line in runs[0] if 'outcome="released"' in line]
    assert len(front_after_first_run) == 1
    assert f'job_id="{front_after_first_run[0].decode()}"' in released[0]
    assert stopped_at(runs[0]) > 3
    assert resumed_at(runs[1]) == [stopped_at(runs[0])]
    assert redis_client.llen("rq:queue:default") == 0
