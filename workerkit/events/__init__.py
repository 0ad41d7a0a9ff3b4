"""Typed events and commands between job-running processes and their supervisor; the senders.

Each message is one JSON object on one line over a Unix socket (``WORKERKIT_SUPERVISOR_SOCKET``);
docs/operations/lifecycle.md describes every message and field. ``messages`` holds the types,
``wire`` the one decoder and encoder, ``sending`` the client and the batching sender; import them
from here.
"""

from __future__ import annotations

from workerkit.events.messages import (
    COMMANDS,
    EVENT_TYPES,
    IDEMPOTENCY_OUTCOMES,
    OUTCOMES,
    BadMessage,
    CheckpointSaved,
    Command,
    CommandMessage,
    Event,
    EventType,
    FinishedJob,
    Heartbeat,
    Hello,
    Idempotency,
    IdempotencyOutcome,
    JobFinished,
    JobHeartbeat,
    JobOutcome,
    JobsFinished,
    JobStarted,
    Message,
    Outcome,
    QueueStats,
    Release,
    RequestStop,
    StoreHealth,
    WorkerReady,
    WorkerStopping,
)
from workerkit.events.sending import BATCH_DELAY, SOCKET_ENV, BatchingSender, EventClient, client
from workerkit.events.wire import Pending, decode, decode_message, encode, encode_batch

__all__ = (
    "BATCH_DELAY",
    "COMMANDS",
    "EVENT_TYPES",
    "IDEMPOTENCY_OUTCOMES",
    "OUTCOMES",
    "SOCKET_ENV",
    "BadMessage",
    "BatchingSender",
    "CheckpointSaved",
    "Command",
    "CommandMessage",
    "Event",
    "EventClient",
    "EventType",
    "FinishedJob",
    "Heartbeat",
    "Hello",
    "Idempotency",
    "IdempotencyOutcome",
    "JobFinished",
    "JobHeartbeat",
    "JobOutcome",
    "JobStarted",
    "JobsFinished",
    "Message",
    "Outcome",
    "Pending",
    "QueueStats",
    "Release",
    "RequestStop",
    "StoreHealth",
    "WorkerReady",
    "WorkerStopping",
    "client",
    "decode",
    "decode_message",
    "encode",
    "encode_batch",
)
