"""Claiming jobs for :class:`~workerkit.engines.sql.queue.SqlQueue`, acks folded in.

A worker that has finished jobs and free slots settles the finished ones and takes the next in
one write: on PostgreSQL one statement (:data:`~.statements.ACK_AND_CLAIM`, one round trip), on
SQLite one ``BEGIN IMMEDIATE`` transaction (one commit, so one fsync of the WAL). Each ack is
fenced by its lease token exactly as :meth:`SqlQueue.ack` is: a stale token settles nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workerkit.engines.base import Delivery
from workerkit.engines.sql.rules import load_json
from workerkit.engines.sql.statements import ACK, ACK_AND_CLAIM, CLAIM, CLAIM_EXCEPT
from workerkit.errors import StoreError

if TYPE_CHECKING:
    from workerkit.engines.sql.held import Execute
    from workerkit.engines.sql.queue import SqlQueue

__all__ = ("Ack", "claim")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ack:
    """A job that succeeded, to be settled by the next claim: its fence and encoded result."""

    job_id: str
    token: str
    result: str  # JSON


def claim(
    queue: SqlQueue,
    queues: Sequence[str],
    worker_id: str,
    limit: int,
    acks: Sequence[Ack] = (),
) -> tuple[list[Delivery], set[str]]:
    """Settle ``acks`` and take up to ``limit`` jobs; the deliveries, and the acks that matched.

    The acks are written by the first round, whether or not it claims anything (``limit`` 0,
    or the claim gate closed); an ack missing from the returned ids matched no row (its lease
    was lost, or the job was settled already). No round claims a job of ``acks``: its old
    attempt may still be running here. Raises what the first round raises: the acks were then
    not written, or written with nobody told (a connection lost at the commit), which the fence
    makes safe to write again. A later round's failure is logged, and what the earlier rounds
    wrote (acks, jobs) is returned.
    """
    if not queues:
        limit = 0
    if limit < 1 and not acks:
        return [], set()
    queue._ensure_schema()
    params: dict[str, Any] = {
        "p_queues": list(queues),
        "p_worker": worker_id,
        "p_ttl": queue.lease_ttl,
    }
    claimed: list[Delivery] = []
    exhausted: list[Any] = []
    acked: set[str] = set()
    pending = list(acks)
    keep_out = [ack.job_id for ack in acks]
    acks_written = False  # the first round committed, with acks
    while len(claimed) < limit or pending:
        round_params = {**params, "p_limit": max(0, limit - len(claimed))}
        try:
            # A claim that committed just before its connection broke leaves its jobs
            # leased to a token nobody knows: they come back after V, as after a crash,
            # whether or not the claim is sent again.
            rows = queue._twice_on_disconnect(
                functools.partial(_claim_round, queue, round_params, pending, keep_out)
            )
        except StoreError:
            if not claimed and not acks_written:
                raise
            # Each round committed on its own: the jobs of the earlier rounds are ours
            # (leased, attempt counted), so hand them out rather than strand them until V;
            # and the acks are written: told, their job threads need not write them again.
            log.warning(
                "claim round failed; returning the jobs already claimed",
                extra={"event": "claim_failed", "claimed": len(claimed)},
                exc_info=True,
            )
            break
        acks_written, pending = bool(acks), []
        acked.update(row.id for row in rows if row.state == "acked")
        failed = [row for row in rows if row.state == "failed"]
        exhausted.extend(failed)
        claimed.extend(_delivery(row) for row in rows if row.state == "running")
        if not failed:
            break  # everything runnable that we could lock is ours now
    for row in exhausted:
        log.warning(
            "job failed: lease expired with no attempts left",
            extra={
                "event": "job_lease_exhausted",
                "job_id": row.id,
                "queue": row.queue,
                "attempts": row.attempts,
                "max_attempts": row.max_attempts,
            },
        )
    claimed.sort(key=lambda d: (d.enqueued_at or 0.0, d.job_id))
    return claimed, acked


def _claim_round(
    queue: SqlQueue, params: Mapping[str, Any], acks: Sequence[Ack], keep_out: Sequence[str]
) -> list[Any]:
    held = queue._held  # the claim's own connection (.held), when it is free
    with queue._errors(), held.connection() as execute:
        if execute is not None:
            return _round(queue, execute, params, acks, keep_out)
    with queue._statement() as conn:

        def through_sqlalchemy(statement: Any, values: Mapping[str, Any]) -> tuple[list[Any], int]:
            result = conn.execute(statement, values)
            return (list(result.all()) if result.returns_rows else []), result.rowcount

        return _round(queue, through_sqlalchemy, params, acks, keep_out)


def _round(
    queue: SqlQueue,
    execute: Execute,
    params: Mapping[str, Any],
    acks: Sequence[Ack],
    keep_out: Sequence[str],
) -> list[Any]:
    claim, params = _gated(queue, params, keep_out)
    if queue.dialect == "postgresql":
        return _pg_round(execute, claim, params, acks)
    # SQLite: in the claim's BEGIN IMMEDIATE transaction, committed with it.
    rows: list[Any] = [
        _Acked(ack.job_id)
        for ack in acks
        if execute(ACK, {"p_id": ack.job_id, "p_token": ack.token, "p_result": ack.result})[1] == 1
    ]
    if params["p_limit"] > 0:
        rows.extend(execute(claim, params)[0])
    return rows


def _gated(
    queue: SqlQueue, params: Mapping[str, Any], keep_out: Sequence[str]
) -> tuple[Any, dict[str, Any]]:
    """The claim statement and its parameters, asked of the claim gate once connected."""
    # Connected (PostgreSQL) or holding the write lock (SQLite): the last moment to hold back,
    # after a wait that may have spanned an outage. The acks go all the same.
    params = dict(params)
    if queue.claim_gate is not None and not queue.claim_gate():
        params["p_limit"] = 0
    if keep_out:
        params["p_except"] = list(keep_out)
        return CLAIM_EXCEPT, params
    return CLAIM, params


def _pg_round(
    execute: Execute, claim: Any, params: dict[str, Any], acks: Sequence[Ack]
) -> list[Any]:
    if not acks:
        return execute(claim, params)[0] if params["p_limit"] > 0 else []
    values = {
        **params,
        "p_ack_ids": [ack.job_id for ack in acks],
        "p_ack_tokens": [ack.token for ack in acks],
        "p_ack_results": [ack.result for ack in acks],
    }
    return execute(ACK_AND_CLAIM, values)[0]


@dataclass(frozen=True)
class _Acked:
    id: str
    state: str = "acked"


def _delivery(row: Any) -> Delivery:
    return Delivery(
        job_id=row.id,
        task=row.task,
        queue=row.queue,
        payload=row.payload,
        attempt=row.attempts,
        max_attempts=row.max_attempts,
        token=row.lease_token,
        checkpoint=load_json(row.checkpoint),
        enqueued_at=row.run_at,
        lease_expires_at=row.lease_expires_at,
    )
