"""Idempotency keys: a task that runs twice with the same key does its work once.

The decorator and the per-task policy are in :mod:`.policy`, the store contract in
:mod:`.contract`, the stores in :mod:`.sql`, :mod:`.redis` and :mod:`.memory` (imported on use:
``import workerkit`` loads neither SQLAlchemy nor redis). See docs/howto/idempotent-tasks.md.
"""

from __future__ import annotations

from workerkit.idempotency.contract import IDEMPOTENCY_OUTCOMES as IDEMPOTENCY_OUTCOMES
from workerkit.idempotency.contract import Claim as Claim
from workerkit.idempotency.contract import ClaimOutcome as ClaimOutcome
from workerkit.idempotency.contract import IdempotencyOutcome as IdempotencyOutcome
from workerkit.idempotency.contract import IdempotencyRecord as IdempotencyRecord
from workerkit.idempotency.contract import IdempotencyStore as IdempotencyStore
from workerkit.idempotency.policy import Idempotency as Idempotency
from workerkit.idempotency.policy import KeySpec as KeySpec
from workerkit.idempotency.policy import fingerprint as fingerprint
from workerkit.idempotency.policy import idempotency_of as idempotency_of
from workerkit.idempotency.policy import idempotent as idempotent
from workerkit.idempotency.policy import in_progress_expiry_for as in_progress_expiry_for
from workerkit.idempotency.policy import outcome_of as outcome_of
from workerkit.idempotency.shared import default_store as default_store
from workerkit.idempotency.shared import shared_store as shared_store

__all__ = (
    "IDEMPOTENCY_OUTCOMES",
    "Claim",
    "ClaimOutcome",
    "Idempotency",
    "IdempotencyOutcome",
    "IdempotencyRecord",
    "IdempotencyStore",
    "KeySpec",
    "default_store",
    "fingerprint",
    "idempotency_of",
    "idempotent",
    "in_progress_expiry_for",
    "outcome_of",
    "shared_store",
)
