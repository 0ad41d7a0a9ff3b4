"""Idempotency records in SQLite or PostgreSQL: one row per key in ``workerkit_idempotency``.

A claim is one ``INSERT ... ON CONFLICT (key) DO UPDATE ... RETURNING`` on the database clock;
completion and forget are fenced by the owner token; writes are retried while the database is
unreachable. Why and how: docs/howto/idempotent-tasks.md.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from workerkit.engines.sql import db
from workerkit.engines.sql.outage import backoff, lease_bound
from workerkit.engines.sql.schema import db_now, idempotency_keys
from workerkit.errors import StoreError, StoreUnavailable
from workerkit.idempotency.contract import Claim, IdempotencyRecord, check_seconds, log_fenced_out
from workerkit.job import current_job_or_none

__all__ = ("SqlIdempotencyStore",)

log = logging.getLogger(__name__)

_t = idempotency_keys
_c = idempotency_keys.c

#: How often a claim goes round when the live record it lost to vanished before it could read it.
_CLAIM_ROUNDS: Final = 5

#: Claims whose end the store remembers (for the retries of their complete and forget); past
#: this many, those whose claim surely ended an hour ago are dropped.
_KEEP_CLAIMS: Final = 1000

_T = TypeVar("_T")


class SqlIdempotencyStore(db.ForkSafeEngine):
    """:class:`~workerkit.idempotency.IdempotencyStore` on SQLite or PostgreSQL.

    ``url`` is a database URL (the store owns its engine) or a SQLAlchemy engine made by
    :func:`workerkit.engines.sql.create_engine_for` (shared; :meth:`close` leaves it open). The
    table comes from ``workerkit db upgrade``; without it every call raises
    :class:`~workerkit.errors.SchemaOutOfDate`. Safe to share between threads.
    """

    def __init__(self, url: str | sa.URL | sa.Engine) -> None:
        self._owns_engine = not isinstance(url, sa.Engine)
        self._adopt_engine(url if isinstance(url, sa.Engine) else db.create_engine_for(url))
        self.url = self._engine.url
        self.dialect = self.url.get_backend_name()
        # Owner token -> the monotonic time until which its claim surely holds (lease_bound).
        self._held: dict[str, float] = {}
        self._held_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SqlIdempotencyStore {self.url.render_as_string(hide_password=True)}>"

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self._errors(), self.engine.begin() as conn:
            yield conn

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return db.store_errors(
            self.url, tables="workerkit_idempotency table is", otherwise=self._store_error
        )

    def _store_error(self, exc: sa.exc.DBAPIError) -> StoreError:
        return StoreError(f"idempotency store: {db.describe_error(exc, self.url)}")

    def _after_fork(self) -> None:
        self._held_lock = threading.Lock()
        self._held = {}

    # --- retrying writes while the database is unreachable -------------------------------

    def _retried(self, what: str, key: str, write: Callable[[bool], _T], until: float) -> _T:
        """``write(again)``, sent again after each StoreUnavailable while the monotonic clock is
        before ``until``, and once more in any case (a killed session's pool is replaced at
        once). ``again`` tells a retry, whose earlier try may have committed unanswered."""
        delays = backoff()
        failures = 0
        while True:
            try:
                result = write(failures > 0)
            except StoreUnavailable as exc:
                failures += 1
                left = until - time.monotonic()
                if failures > 1 and left <= 0:
                    raise
                if failures == 1:
                    log.warning(
                        "idempotency store: %s failed; retrying while the claim holds",
                        what,
                        extra={
                            "event": "idempotency_store_retry",
                            "what": what,
                            "key": key,
                            "error": str(exc),
                            "claim_left": round(left, 2),
                        },
                    )
                time.sleep(next(delays))
                continue
            if failures:
                log.info(
                    "idempotency store: %s written after the database came back",
                    what,
                    extra={
                        "event": "idempotency_store_recovered",
                        "what": what,
                        "key": key,
                        "failures": failures,
                    },
                )
            return result

    def _hold(self, token: str, until: float) -> None:
        with self._held_lock:
            if len(self._held) >= _KEEP_CLAIMS:
                stale = time.monotonic() - 3600
                self._held = {t: u for t, u in self._held.items() if u > stale}
            self._held[token] = until

    def _release_hold(self, token: str) -> float:
        """When ``token``'s claim surely ends (now if this store did not make it); forgotten."""
        with self._held_lock:
            held = self._held.pop(token, None)
        return time.monotonic() if held is None else held

    @staticmethod
    def _job_deadline(until: float) -> float:
        """``until``, or the running job's deadline (monotonic) when that is later."""
        context = current_job_or_none()
        left = context.time_left() if context is not None else None
        return until if left is None else max(until, time.monotonic() + left)

    def _upsert(self, key: str, fingerprint: str, token: str, in_progress_expiry: float) -> Any:
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        now = db_now()
        statement = insert(_t).values(
            key=key,
            fingerprint=fingerprint,
            state="in_progress",
            owner_token=token,
            result=None,
            takeovers=0,
            expires_at=now + in_progress_expiry,
            claimed_at=now,
            completed_at=None,
        )
        excluded = statement.excluded
        return statement.on_conflict_do_update(
            index_elements=[_c.key],
            set_={
                "fingerprint": excluded.fingerprint,
                "state": "in_progress",
                "owner_token": excluded.owner_token,
                "result": None,
                # Taking over an abandoned claim counts; reclaiming an expired result does not.
                "takeovers": sa.case((_c.state == "in_progress", _c.takeovers + 1), else_=0),
                "expires_at": excluded.expires_at,
                "claimed_at": excluded.claimed_at,
                "completed_at": None,
            },
            where=_c.expires_at <= db_now(),
        ).returning(_c.owner_token, _c.takeovers)

    def claim(self, key: str, fingerprint: str, *, in_progress_expiry: float) -> Claim:
        """Claim ``key``, or report the live record that holds it (see the module docstring).

        Retried while the database is unreachable, for as long as the claim would hold.
        """
        check_seconds("in_progress_expiry", in_progress_expiry)
        token = secrets.token_hex(16)
        held_until = lease_bound(time.monotonic(), in_progress_expiry)

        def write(again: bool) -> Claim:
            return self._claim_once(key, fingerprint, token, in_progress_expiry)

        claim = self._retried("claim", key, write, held_until)
        if claim.owned:
            self._hold(token, held_until)
        return claim

    def _claim_once(
        self, key: str, fingerprint: str, token: str, in_progress_expiry: float
    ) -> Claim:
        upsert = self._upsert(key, fingerprint, token, in_progress_expiry)
        live = sa.select(
            _c.state,
            _c.fingerprint,
            _c.owner_token,
            _c.result,
            _c.takeovers,
            (_c.expires_at - db_now()).label("remaining"),
        ).where(_c.key == key)
        with self._write() as conn:
            for _ in range(_CLAIM_ROUNDS):
                won = conn.execute(upsert).first()
                if won is not None:
                    if won.owner_token != token:  # pragma: no cover - a database bug
                        raise StoreError(f"idempotency claim of {key!r} returned another token")
                    return Claim("taken_over" if won.takeovers > 0 else "claimed", token=token)
                row = conn.execute(live).first()
                if row is None or row.remaining <= 0:
                    continue  # forgotten or expired since the upsert looked: go round
                if row.owner_token == token:  # an earlier try committed; its answer was lost
                    return Claim("taken_over" if row.takeovers > 0 else "claimed", token=token)
                if row.fingerprint != fingerprint:
                    return Claim("mismatch")
                if row.state == "completed":
                    return Claim("replay", result_json=row.result)
                return Claim("in_progress", retry_after=float(row.remaining))
        raise StoreError(
            f"idempotency claim of {key!r} kept losing to records that vanished; is something "
            "deleting workerkit_idempotency rows in a loop?"
        )

    def complete(self, key: str, token: str, result_json: str, *, retention: float) -> bool:
        """Record the result for ``retention`` seconds; False when ``token`` lost the key.

        Retried while the database is unreachable: while the claim surely holds, and past that
        until the running job's deadline (the token decides whether a late write still lands).
        """
        check_seconds("retention", retention)
        now = db_now()
        statement = (
            sa.update(_t)
            .where(_c.key == key, _c.owner_token == token, _c.state == "in_progress")
            .values(
                state="completed",
                result=result_json,
                expires_at=now + retention,
                completed_at=now,
            )
        )
        ours = sa.select(_c.key).where(
            _c.key == key, _c.owner_token == token, _c.state == "completed"
        )

        def write(again: bool) -> bool:
            with self._write() as conn:
                if conn.execute(statement).rowcount == 1:
                    return True
                # A retry: the try whose answer was lost may have completed it already.
                return again and conn.execute(ours).first() is not None

        done = self._retried("complete", key, write, self._job_deadline(self._release_hold(token)))
        if not done:
            log_fenced_out(log, key)
        return done

    def forget(self, key: str, token: str) -> bool:
        """Delete the claim ``token`` holds; False when it holds none.

        Retried while the database is unreachable and the claim surely holds (past that it is
        claimable anyway).
        """
        statement = sa.delete(_t).where(
            _c.key == key, _c.owner_token == token, _c.state == "in_progress"
        )

        def write(again: bool) -> bool:
            with self._write() as conn:
                return bool(conn.execute(statement).rowcount == 1)

        return self._retried("forget", key, write, self._release_hold(token))

    def get(self, key: str) -> IdempotencyRecord | None:
        """The record of ``key`` (expired ones included), or None."""
        statement = sa.select(
            _c.key,
            _c.state,
            _c.fingerprint,
            _c.owner_token,
            _c.result,
            (_c.expires_at - db_now()).label("remaining"),
            _c.takeovers,
        ).where(_c.key == key)
        with self._errors(), self.engine.connect() as conn:
            conn.execution_options(**{db.READ_ONLY_OPTION: True})
            row = conn.execute(statement).first()
        if row is None:
            return None
        return IdempotencyRecord(
            key=row.key,
            state=cast(Any, row.state),
            fingerprint=row.fingerprint,
            owner_token=row.owner_token,
            result_json=row.result,
            expires_in=float(row.remaining),
            takeovers=int(row.takeovers),
        )

    def purge_expired(self, older_than: float = 0.0) -> int:
        """Delete records that expired over ``older_than`` seconds ago; return how many.

        Safe at any time: an expired record is claimable anyway. (A purged abandoned claim is
        later reported as ``claimed`` rather than ``taken_over``; nothing else changes.)
        """
        statement = sa.delete(_t).where(_c.expires_at <= db_now() - older_than)
        with self._write() as conn:
            count = int(conn.execute(statement).rowcount)
        if count:
            log.info(
                "purged expired idempotency records",
                extra={"event": "idempotency_purged", "count": count},
            )
        return count

    def close(self) -> None:
        """Close the engine's connections (unless the engine was given)."""
        if self._owns_engine:
            self._engine.dispose()
