"""Queue entries kombu cannot read: dead-lettered with the reason; never a worker crash.

Checked where the entry is read, before kombu parses it: on what the task consumer's pop returns
(pop.py) and on a kombu BRPOP reply (:func:`guard_deliveries`); a refused entry goes to
:func:`dead_key`. What is refused and why: docs/engines/celery.md ("Poison entries").
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ("DEAD_PREFIX", "dead_key", "dead_record", "describe", "guard_deliveries", "refusal")

log = logging.getLogger("workerkit.engines.celery")

#: The dead-letter list of a queue: ``workerkit:celery:dead:<queue>``, one JSON object per
#: entry (``entry``: the raw entry, base64; ``text``: it, readable; ``queue``, ``reason``,
#: ``worker``, ``at``), oldest first.
DEAD_PREFIX: Final = "workerkit:celery:dead:"
#: How much of an entry a log line or the record's ``text`` quotes.
_QUOTED: Final = 120


def dead_key(queue: str) -> str:
    """The dead-letter list of ``queue``."""
    return DEAD_PREFIX + queue


def refusal(raw: bytes, decode_body: Callable[[Any, Any], Any]) -> str | None:
    """Why kombu could not deliver the queue entry ``raw``, or None when it can.

    What kombu reads before Celery's own checks apply: UTF-8 JSON text, an object, with a
    ``properties`` object holding a ``delivery_tag`` and a ``delivery_info`` object naming the
    ``exchange`` and ``routing_key`` (kombu's unacked record), and a body that decodes with
    its ``body_encoding``. A readable envelope with an unknown task or a bad body is Celery's
    to refuse (it logs and acknowledges it).
    """
    try:
        payload = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except ValueError as exc:
        return f"not JSON: {exc}"
    if not isinstance(payload, dict):
        return f"not a message: a JSON {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "not a message: no 'properties' object"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str | int) or isinstance(tag, bool):
        return "not a message: no 'properties.delivery_tag'"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not {"exchange", "routing_key"} <= info.keys():
        return "not a message: no 'properties.delivery_info' with exchange and routing_key"
    body = payload.get("body")
    if body:
        try:
            decode_body(body, properties.get("body_encoding"))
        except Exception as exc:
            return f"the body does not decode: {type(exc).__name__}: {exc}"
    return None


def describe(raw: bytes) -> str:
    """A queue entry as readable text (undecodable bytes escaped), cut for a log line."""
    text = raw.decode("utf-8", "backslashreplace")
    return text if len(text) <= _QUOTED else text[:_QUOTED] + "..."


def dead_record(queue: str, raw: bytes, reason: str, worker: str) -> str:
    """The dead-letter list's record of ``raw``, popped from ``queue``: a JSON object."""
    record = {
        "entry": base64.b64encode(raw).decode("ascii"),
        "text": describe(raw),
        "queue": queue,
        "reason": reason,
        "worker": worker,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return json.dumps(record, separators=(",", ":"))


def guard_deliveries(
    channel: Any, dead_letter: Callable[[str, bytes, str], None], *, prefix: str = ""
) -> None:
    """Check every entry the task consumer's ``channel`` pops before kombu parses it.

    kombu reads a BRPOP reply with ``channel.client.parse_response``: a refused entry is given
    to ``dead_letter(queue, raw, reason)`` and the reply becomes "nothing popped" (kombu raises
    its Empty, and the loop reads on). Once per channel (a reconnection makes a new one).
    """
    client = channel.client
    if getattr(client, "_workerkit_guarded", False):
        return
    parse = client.parse_response
    sep = str(getattr(channel, "sep", "\x06\x16"))
    decode_body = channel.decode_body

    def parse_response(connection: Any, command: str, **options: Any) -> Any:
        reply = parse(connection, command, **options)
        if command != "BRPOP" or not reply:
            return reply
        dest, raw = reply
        if not isinstance(raw, bytes):
            raw = str(raw).encode("utf-8")
        reason = refusal(raw, decode_body)
        if reason is None:
            return reply
        queue = dest.decode("utf-8", "replace") if isinstance(dest, bytes) else str(dest)
        queue = queue.rsplit(sep, 1)[0]
        if prefix and queue.startswith(prefix):
            queue = queue[len(prefix) :]
        dead_letter(queue, raw, reason)
        return None

    client.parse_response = parse_response
    client._workerkit_guarded = True
