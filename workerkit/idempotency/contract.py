"""The idempotency store contract: what a claim found, a key's record, and the Store protocol.

These types live apart from the decorator and from every store, so that the stores import them
without importing the package that chooses a store (no import cycle), and ``import workerkit``
(every RQ or Celery worker) loads neither SQLAlchemy nor redis for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final, Literal, Protocol

__all__ = (
    "IDEMPOTENCY_OUTCOMES",
    "Claim",
    "ClaimOutcome",
    "IdempotencyOutcome",
    "IdempotencyRecord",
    "IdempotencyStore",
    "check_seconds",
    "log_fenced_out",
)

#: What a store's claim found: the caller now owns the key (``claimed``, ``taken_over``), or
#: must replay, refuse or defer.
ClaimOutcome = Literal["claimed", "taken_over", "replay", "mismatch", "in_progress"]

#: The ``outcome`` of an ``idempotency`` event (and of the metric the supervisor counts).
IdempotencyOutcome = Literal["claimed", "replayed", "deferred", "taken_over", "mismatched"]
IDEMPOTENCY_OUTCOMES: Final[frozenset[str]] = frozenset(IdempotencyOutcome.__args__)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Claim:
    """What :meth:`IdempotencyStore.claim` found and did.

    ``token`` is set when the caller now owns the key (``claimed``, ``taken_over``);
    ``result_json`` is the stored result (JSON text) for ``replay``; ``retry_after`` is the time
    in seconds, by the store's clock, until the live holder's claim expires (``in_progress``).
    """

    outcome: ClaimOutcome
    token: str | None = None
    result_json: str | None = None
    retry_after: float | None = None

    @property
    def owned(self) -> bool:
        """Whether the caller holds the key now and should run."""
        return self.outcome in ("claimed", "taken_over")


@dataclass(frozen=True)
class IdempotencyRecord:
    """One key's record as a store holds it (for inspection and tests).

    ``expires_in`` is seconds from now by the store's clock (zero or less: expired, though not
    yet removed); ``takeovers`` counts expired claims taken over since the last fresh claim.
    """

    key: str
    state: Literal["in_progress", "completed"]
    fingerprint: str
    owner_token: str
    result_json: str | None
    expires_in: float
    takeovers: int


class IdempotencyStore(Protocol):
    """Where idempotency records live. Every method is atomic on the store's side.

    Implementations: SQL (SQLite, PostgreSQL), Redis, and in memory for tests. One contract test
    suite (tests/integration/test_idempotency_contract.py) holds them to the same behaviour.
    """

    def claim(self, key: str, fingerprint: str, *, in_progress_expiry: float) -> Claim:
        """Claim ``key`` for ``in_progress_expiry`` seconds unless a live record holds it.

        No record, or an expired one (in progress or completed): a new record in progress
        with a new owner token (``claimed``; ``taken_over`` when an expired claim was
        replaced). A live record with another fingerprint: ``mismatch``. A live completed
        record: ``replay`` with its result. A live claim: ``in_progress``.
        """
        ...

    def complete(self, key: str, token: str, result_json: str, *, retention: float) -> bool:
        """Record the result and keep it ``retention`` seconds; fenced by ``token``.

        False (and nothing written) when ``token`` no longer holds the key: it was taken over,
        forgotten or completed already. A claim that expired but was not taken over may still
        complete.
        """
        ...

    def forget(self, key: str, token: str) -> bool:
        """Delete the in-progress record ``token`` holds (the run failed); False when not held."""
        ...

    def get(self, key: str) -> IdempotencyRecord | None:
        """The record of ``key``, expired or not, or None."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def check_seconds(what: str, value: float) -> None:
    """Refuse a zero, negative or non-finite duration (a store must never make one)."""
    if not (isinstance(value, int | float) and 0 < value < float("inf")):
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")


def log_fenced_out(log: logging.Logger, key: str) -> None:
    """Log a completion refused because its owner token no longer holds ``key``."""
    log.warning(
        "idempotency completion fenced out",
        extra={"event": "idempotency_complete_fenced", "key": key},
    )
