"""The canaries' own records: one per execution, in the engine's store.

A canary writes a record when it starts and finishes it when it ends (SQL: a row of
``workerkit_drill_runs``; Redis: a hash under ``workerkit:drill:<id>:`` with a TTL). The drill
reads them back to compute its report, so its numbers are what the workers did, never what a
supervisor logged. A record that never ends is an execution whose process died. A completion
is written in one atomic write with the canary's "done" mark, which a redelivered run checks first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    import sqlalchemy as sa
    from redis import Redis

__all__ = (
    "OUTCOMES",
    "REDIS_PREFIX",
    "REDIS_TTL",
    "CanaryRun",
    "RecordStore",
    "RedisRecords",
    "SqlRecords",
    "redis_key",
)

#: How an execution ended; None while it runs (or when its process was killed). ``redelivered``:
#: a run that found its canary already completed and skipped the body (a lost acknowledgement).
OUTCOMES: Final = ("completed", "released", "failed", "lease_lost", "interrupted", "redelivered")

#: Every Redis key of a drill starts with this, then the drill id.
REDIS_PREFIX: Final = "workerkit:drill:"

#: Seconds a drill's Redis records live after their last write (a day: long enough to read a
#: report again, short enough that drills leave nothing behind).
REDIS_TTL: Final = 86400


@dataclass(frozen=True)
class CanaryRun:
    """One execution of one canary, as the canary recorded it."""

    drill_id: str
    run_id: str
    seq: int
    kind: str
    attempt: int
    hostname: str
    pid: int
    enqueued_at: float
    started_at: float
    ended_at: float | None = None
    outcome: str | None = None
    resumed: bool = False

    @property
    def released(self) -> bool:
        return self.outcome == "released"

    @property
    def completed(self) -> bool:
        return self.outcome == "completed"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RecordStore(Protocol):
    """Where canaries write their records and the drill reads them."""

    def started(self, run: CanaryRun) -> None: ...

    def ended(self, run: CanaryRun, ended_at: float, outcome: str) -> None:
        """Finish ``run``'s record; a ``completed`` end marks its canary done in the same
        atomic write (so no process dies between the two)."""
        ...

    def completed_before(self, drill_id: str, seq: int) -> bool:
        """Whether canary ``seq`` of ``drill_id`` already has a completed run."""
        ...

    def runs(self, drill_id: str) -> list[CanaryRun]: ...

    def close(self) -> None: ...


class SqlRecords:
    """The records as rows of ``workerkit_drill_runs`` (the SQL engine's database)."""

    def __init__(self, url: str, *, engine: sa.Engine | None = None) -> None:
        from workerkit.engines.sql.db import create_engine_for

        self._engine = engine or create_engine_for(url)
        self._pid = os.getpid()

    @property
    def engine(self) -> sa.Engine:
        if os.getpid() != self._pid:  # a forked child: fresh connections, the parent's kept
            self._engine.dispose(close=False)
            self._pid = os.getpid()
        return self._engine

    def started(self, run: CanaryRun) -> None:
        from workerkit.engines.sql.schema import drill_runs

        with self.engine.begin() as connection:
            connection.execute(drill_runs.insert().values(**asdict(run)))

    def ended(self, run: CanaryRun, ended_at: float, outcome: str) -> None:
        from workerkit.engines.sql.schema import drill_runs

        table = drill_runs
        with self.engine.begin() as connection:
            connection.execute(
                table.update()
                .where(table.c.drill_id == run.drill_id, table.c.run_id == run.run_id)
                .values(ended_at=ended_at, outcome=outcome)
            )

    def completed_before(self, drill_id: str, seq: int) -> bool:
        """The ``completed`` outcome is the mark: ``ended`` sets it in one UPDATE."""
        from sqlalchemy import select

        from workerkit.engines.sql.schema import drill_runs

        table = drill_runs
        with self.engine.connect() as connection:
            found = connection.execute(
                select(table.c.run_id)
                .where(
                    table.c.drill_id == drill_id,
                    table.c.seq == seq,
                    table.c.outcome == "completed",
                )
                .limit(1)
            ).first()
        return found is not None

    def runs(self, drill_id: str) -> list[CanaryRun]:
        from workerkit.engines.sql.db import READ_ONLY_OPTION
        from workerkit.engines.sql.schema import drill_runs

        with self.engine.connect() as connection:
            connection.execution_options(**{READ_ONLY_OPTION: True})
            rows = connection.execute(
                drill_runs.select().where(drill_runs.c.drill_id == drill_id)
            ).mappings()
            return [_run_of(dict(row)) for row in rows]

    def close(self) -> None:
        self._engine.dispose()


def redis_key(drill_id: str, suffix: str) -> str:
    """``workerkit:drill:<id>:<suffix>``."""
    return f"{REDIS_PREFIX}{drill_id}:{suffix}"


class RedisRecords:
    """The records as Redis hashes: ``workerkit:drill:<id>:run:<run id>``, indexed by the set
    ``workerkit:drill:<id>:runs``; every key expires :data:`REDIS_TTL` s after its last write."""

    def __init__(self, client: Redis[bytes], *, ttl: int = REDIS_TTL) -> None:
        self.client = client
        self.ttl = ttl

    @classmethod
    def from_url(cls, url: str) -> RedisRecords:
        from redis import Redis

        return cls(Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10))

    def started(self, run: CanaryRun) -> None:
        key = redis_key(run.drill_id, f"run:{run.run_id}")
        index = redis_key(run.drill_id, "runs")
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=_redis_fields(asdict(run)))
        pipe.expire(key, self.ttl)
        pipe.sadd(index, run.run_id)
        pipe.expire(index, self.ttl)
        pipe.execute()

    def ended(self, run: CanaryRun, ended_at: float, outcome: str) -> None:
        """One MULTI/EXEC: the run's end and, when it completed, its canary's mark in the hash
        ``workerkit:drill:<id>:done`` (seq -> the first completing run's id, HSETNX)."""
        key = redis_key(run.drill_id, f"run:{run.run_id}")
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=_redis_fields({"ended_at": ended_at, "outcome": outcome}))
        pipe.expire(key, self.ttl)
        if outcome == "completed":
            done = redis_key(run.drill_id, "done")
            pipe.hsetnx(done, str(run.seq), run.run_id)
            pipe.expire(done, self.ttl)
        pipe.execute()

    def completed_before(self, drill_id: str, seq: int) -> bool:
        return bool(self.client.hexists(redis_key(drill_id, "done"), str(seq)))

    def runs(self, drill_id: str) -> list[CanaryRun]:
        ids = sorted(self.client.smembers(redis_key(drill_id, "runs")))
        found: list[CanaryRun] = []
        for chunk in _chunks(ids, 500):
            pipe = self.client.pipeline(transaction=False)
            for run_id in chunk:
                pipe.hgetall(redis_key(drill_id, f"run:{_text(run_id)}"))
            found.extend(
                _run_of({_text(k): json.loads(v) for k, v in fields.items()})
                for fields in pipe.execute()
                if fields
            )
        return found

    def close(self) -> None:
        self.client.close()


def _redis_fields(values: dict[str, Any]) -> dict[str | bytes, str]:
    return {key: json.dumps(value) for key, value in values.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _run_of(values: dict[str, Any]) -> CanaryRun:
    return CanaryRun(
        drill_id=str(values["drill_id"]),
        run_id=str(values["run_id"]),
        seq=int(values["seq"]),
        kind=str(values["kind"]),
        attempt=int(values["attempt"]),
        hostname=str(values["hostname"]),
        pid=int(values["pid"]),
        enqueued_at=float(values["enqueued_at"]),
        started_at=float(values["started_at"]),
        ended_at=None if values.get("ended_at") is None else float(values["ended_at"]),
        outcome=values.get("outcome"),
        resumed=bool(values.get("resumed")),
    )
