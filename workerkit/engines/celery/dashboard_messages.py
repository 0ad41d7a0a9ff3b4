"""kombu's Redis messages as the dashboard shows them: rows, details, versions, retry copies.

Only reads and rewrites the message JSON kombu stores (its ``headers``, ``properties`` and
encoded ``body``); a body is decoded only when it is JSON text: pickle (and any other
serializer) is shown as "CONTENT-TYPE, not decoded", never loaded.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from workerkit.dashboard.model import JobDetail, JobRow, JobState
from workerkit.engines.celery.ledger import CRASHES_HEADER, count

__all__ = (
    "CAP",
    "Message",
    "detail",
    "entry_id",
    "fresh_copy",
    "parse_eta",
    "version_of",
)

#: A detail's text is cut at this many characters (with a note).
CAP: Final = 64 * 1024
#: Content types whose body is text we show as it is.
_TEXT_TYPES: Final = ("application/json", "text/plain")


def version_of(entry: bytes) -> str:
    """The fence of a list entry or unacked record: the hash of its exact bytes."""
    return hashlib.sha1(entry, usedforsecurity=False).hexdigest()


def entry_id(entry: bytes) -> str:
    """The id of an entry that has no task id (not a message kombu can read)."""
    return "entry-" + version_of(entry)[:16]


def parse_eta(value: Any) -> float | None:
    """Celery's ``eta`` header (ISO 8601) as epoch seconds; None when missing or unreadable."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _cap(text: str | None) -> str | None:
    if text is None or len(text) <= CAP:
        return text
    return text[:CAP] + f"\n... (cut at {CAP // 1024} KiB of {len(text)} characters)"


@dataclass(frozen=True)
class Message:
    """One kombu message (a queue entry, an unacked record's payload, a dead-letter entry)."""

    raw: bytes
    payload: Mapping[str, Any] | None  # None: not a JSON object

    @classmethod
    def parse(cls, raw: bytes) -> Message:
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return cls(raw, None)
        return cls(raw, payload if isinstance(payload, dict) else None)

    @property
    def headers(self) -> Mapping[str, Any]:
        headers = (self.payload or {}).get("headers")
        return headers if isinstance(headers, dict) else {}

    @property
    def properties(self) -> Mapping[str, Any]:
        properties = (self.payload or {}).get("properties")
        return properties if isinstance(properties, dict) else {}

    @property
    def id(self) -> str:
        found = self.headers.get("id")
        return str(found) if found else entry_id(self.raw)

    @property
    def task(self) -> str:
        return str(self.headers.get("task") or "?")

    @property
    def eta(self) -> float | None:
        return parse_eta(self.headers.get("eta"))

    @property
    def attempt(self) -> int:
        """As the task sees it: 1 + Celery's retries + the runs whose worker died."""
        return 1 + count(self.headers.get("retries")) + count(self.headers.get(CRASHES_HEADER))

    def row(self, queue: str, state: JobState, version: str, **known: Any) -> JobRow:
        fields: dict[str, Any] = {
            "attempt": self.attempt,
            "max_attempts": None,
            "enqueued_at": None,
            "run_at": self.eta,
            "finished_at": None,
            "worker": None,
            "lease_expires_at": None,
            "has_checkpoint": False,
            "error": None,
        }
        fields.update(known)
        return JobRow(
            id=self.id, queue=queue, task=self.task, state=state, version=version, **fields
        )

    def body_text(self) -> str:
        """The body as the dashboard shows it: JSON/text decoded, anything else named only."""
        payload = self.payload or {}
        body = payload.get("body")
        content_type = str(payload.get("content-type") or "?")
        if body is None:
            return "(no body)"
        if not content_type.startswith(_TEXT_TYPES):
            short = "pickle" if "python-serialize" in content_type else content_type
            return f"{short}, not decoded"
        data: bytes = str(body).encode("utf-8")
        if self.properties.get("body_encoding") == "base64":
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                return "(a base64 body that does not decode)"
        text = data.decode(str(payload.get("content-encoding") or "utf-8"), "replace")
        try:
            return json.dumps(json.loads(text), indent=2, sort_keys=True)
        except ValueError:
            return text

    def extra(self) -> dict[str, str]:
        found = {f"header {k}": json.dumps(v) for k, v in sorted(self.headers.items())}
        for key in ("delivery_tag", "priority", "delivery_info", "body_encoding"):
            if key in self.properties:
                found[f"property {key}"] = json.dumps(self.properties[key])
        if self.payload is not None:
            found["content-type"] = str(self.payload.get("content-type"))
        return found


def detail(
    message: Message,
    row: JobRow,
    *,
    checkpoint: str | None = None,
    error: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> JobDetail:
    """The whole job: the decoded body as ``args``; no result (Celery's backend is not read)."""
    more = message.extra()
    if message.payload is None:
        more["entry"] = message.raw.decode("utf-8", "backslashreplace")
    more.update(extra or {})
    return JobDetail(
        row=row,
        args=_cap(message.body_text()),
        checkpoint=_cap(checkpoint),
        result=None,
        error=_cap(error),
        extra={k: _cap(v) or "" for k, v in more.items()},
    )


def fresh_copy(message: Message) -> bytes | None:
    """The message to send again (a retry from the dashboard): due now, its attempt count
    reset (Celery's retries and workerkit's crash count); workerkit's generation kept, so
    a checkpoint fence still orders it after every earlier run. A new delivery tag, as kombu
    gives each message it publishes: the copy of a cancelled held message is another
    delivery, whose unacked record and lease never stand for the old one's (which its worker
    must still find gone and drop). None: not a kombu message."""
    payload = message.payload
    if payload is None or not isinstance(payload.get("headers"), dict):
        return None
    copy = json.loads(json.dumps(payload))
    properties = copy.get("properties")
    if not isinstance(properties, dict):
        properties = copy["properties"] = {}
    properties["delivery_tag"] = str(uuid.uuid4())
    info = properties.get("delivery_info")
    if isinstance(info, dict):
        info.pop("redelivered", None)  # kombu's mark of the old delivery's restore
    headers = copy["headers"]
    headers["retries"] = 0
    headers["eta"] = None
    headers.pop(CRASHES_HEADER, None)
    headers.pop("redelivered", None)
    return json.dumps(copy).encode("utf-8")
