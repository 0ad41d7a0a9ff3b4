"""The idempotency store contract in memory, for tests: no server, time from a given clock.

Held to the same contract test suite as the SQL and Redis stores. Public as
``workerkit.testing.InMemoryIdempotencyStore``; it lives here, next to the stores it imitates, so
that production code (an app on an in-memory queue) can use it without importing
:mod:`workerkit.testing`.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable

from workerkit.idempotency.contract import Claim, IdempotencyRecord

__all__ = ("InMemoryIdempotencyStore",)


@dataclasses.dataclass
class _Record:
    state: str
    fingerprint: str
    owner_token: str
    expires_at: float
    takeovers: int = 0
    result_json: str | None = None


class InMemoryIdempotencyStore:
    """The idempotency store contract in memory, for tests (thread-safe).

    ``clock`` returns epoch seconds and is the store's only notion of time; pass a
    :class:`~workerkit.testing.ManualClock` to expire claims and results with
    ``clock.advance(...)``. Expired records stay (as rows of the SQL store do until purged) and
    are replaced by the next claim.
    """

    name = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._records: dict[str, _Record] = {}
        # One lock for everything: a claim sees and changes a record in one step, as the SQL
        # store's upsert and the Redis store's script do.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<InMemoryIdempotencyStore records={len(self._records)}>"

    def claim(self, key: str, fingerprint: str, *, in_progress_expiry: float) -> Claim:
        """Claim ``key``, or report the live record that holds it."""
        if not in_progress_expiry > 0:
            raise ValueError(f"in_progress_expiry must be above 0 seconds: {in_progress_expiry!r}")
        with self._lock:
            now = self.clock()
            record = self._records.get(key)
            if record is not None and record.expires_at > now:
                if record.fingerprint != fingerprint:
                    return Claim("mismatch")
                if record.state == "completed":
                    return Claim("replay", result_json=record.result_json)
                return Claim("in_progress", retry_after=record.expires_at - now)
            took_over = record is not None and record.state == "in_progress"
            token = secrets.token_hex(16)
            self._records[key] = _Record(
                state="in_progress",
                fingerprint=fingerprint,
                owner_token=token,
                expires_at=now + in_progress_expiry,
                takeovers=record.takeovers + 1 if record is not None and took_over else 0,
            )
            return Claim("taken_over" if took_over else "claimed", token=token)

    def _held(self, key: str, token: str) -> _Record | None:
        record = self._records.get(key)
        if record is None or record.state != "in_progress" or record.owner_token != token:
            return None
        return record

    def complete(self, key: str, token: str, result_json: str, *, retention: float) -> bool:
        """Record the result for ``retention`` seconds; False when ``token`` lost the key."""
        if not retention > 0:
            raise ValueError(f"retention must be above 0 seconds: {retention!r}")
        with self._lock:
            record = self._held(key, token)
            if record is None:
                return False
            record.state = "completed"
            record.result_json = result_json
            record.expires_at = self.clock() + retention
            return True

    def forget(self, key: str, token: str) -> bool:
        """Delete the claim ``token`` holds; False when it holds none."""
        with self._lock:
            if self._held(key, token) is None:
                return False
            del self._records[key]
            return True

    def get(self, key: str) -> IdempotencyRecord | None:
        """The record of ``key`` (expired ones included), or None."""
        with self._lock:
            record = self._records.get(key)
            if record is None:
                return None
            return IdempotencyRecord(
                key=key,
                state="completed" if record.state == "completed" else "in_progress",
                fingerprint=record.fingerprint,
                owner_token=record.owner_token,
                result_json=record.result_json,
                expires_in=record.expires_at - self.clock(),
                takeovers=record.takeovers,
            )

    def purge_expired(self, older_than: float = 0.0) -> int:
        """Delete records that expired over ``older_than`` seconds ago; return how many."""
        with self._lock:
            cutoff = self.clock() - older_than
            doomed = [key for key, r in self._records.items() if r.expires_at <= cutoff]
            for key in doomed:
                del self._records[key]
            return len(doomed)

    def close(self) -> None:
        """Nothing to release; the records stay readable."""
