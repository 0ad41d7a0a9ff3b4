"""Rules shared by every queue backend (SQL and in-memory), so they cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from workerkit.errors import PayloadError

__all__ = (
    "CRASH_EXHAUSTED_ERROR",
    "JOB_FIELDS",
    "dump_json",
    "lease_exhausted_error",
    "load_json",
    "ref_parts",
)

#: The keys of the dict that ``get_job`` returns, on every backend.
JOB_FIELDS: Final = (
    "id",
    "queue",
    "task",
    "payload",
    "state",
    "attempts",
    "max_attempts",
    "run_at",
    "enqueued_at",
    "lease_token",
    "lease_expires_at",
    "worker_id",
    "checkpoint",
    "result",
    "last_error",
    "created_at",
    "updated_at",
    "finished_at",
)


def dump_json(value: Any, what: str) -> str:
    """``value`` as JSON text; :class:`PayloadError` naming ``what`` when it is not JSON."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PayloadError(
            f"{what} must be JSON (str, int, float, bool, None, list, dict): {exc}"
        ) from exc


def load_json(text: str | None) -> Any:
    """JSON text back to a value; None stays None."""
    return None if text is None else json.loads(text)


def lease_exhausted_error(attempts: int, max_attempts: int, last_error: str | None) -> str:
    """Why a job whose lease expired with no attempts left is failed instead of run again."""
    message = (
        f"lease expired on attempt {attempts} of {max_attempts} without the job finishing; its "
        "worker probably crashed or was killed (out of memory?), so it is not run again"
    )
    if last_error:
        message += f" (earlier error: {last_error})"
    return message


CRASH_EXHAUSTED_ERROR = (
    "the worker exited unexpectedly while running the last allowed attempt (out of memory? a "
    "crash in native code?), so the job is not run again"
)


def ref_parts(ref: Mapping[str, Any]) -> tuple[str, str]:
    """(job_id, token) of a :meth:`~workerkit.engines.base.Delivery.ref`."""
    job_id, token = ref.get("job_id"), ref.get("token")
    if not isinstance(job_id, str) or not isinstance(token, str):
        raise ValueError(f"not a delivery ref (job_id and token strings expected): {ref!r}")
    return job_id, token
