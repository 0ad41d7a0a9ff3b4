"""How the RQ engine decodes job payloads: JSON by default, an opt-in safe pickle, refusals.

RQ's own default serializer is pickle, and unpickling runs whatever code the payload names. JSON
is the default here; ``safe-pickle`` drains queues that producers on RQ's defaults filled,
through an Unpickler whose ``find_class`` admits only basic types and what the worker's
:class:`~workerkit.engines.rq.tasks.RqApp` allows. A job whose payload does not decode is refused
at dequeue (:func:`undecodable`): failed with the reason and the fix, never run, never lost.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

from rq.exceptions import DeserializationError
from rq.serializers import DefaultSerializer, JSONSerializer, resolve_serializer

from workerkit.engines.rq.options import SERIALIZER_ENV, SERIALIZER_NAMES
from workerkit.engines.rq.tasks import TaskNotAllowed
from workerkit.errors import ConfigurationError, PayloadError
from workerkit.events import PayloadRefusal

if TYPE_CHECKING:
    from rq.job import Job

    from workerkit.engines.rq.tasks import RqApp

__all__ = (
    "BASIC_GLOBALS",
    "SERIALIZER_ENV",
    "SERIALIZER_NAMES",
    "PayloadRefusal",
    "RefusedGlobal",
    "SafePickleSerializer",
    "UndecodableJob",
    "resolve_rq_serializer",
    "serializer_for",
    "undecodable",
)

log = logging.getLogger("workerkit.engines.rq")

#: Every pickle of protocol 2 or later (RQ writes the highest) starts with the PROTO opcode; no
#: JSON text can (0x80 is no UTF-8 start byte).
PICKLE_PREFIX: Final = b"\x80"

_BUILTINS: Final = ("bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset")
_BUILTINS_2: Final = ("int", "list", "range", "set", "slice", "str", "tuple")
#: The globals any safe-pickle payload may name: value types whose reconstruction runs no user
#: code. ``_codecs.encode`` is how protocol 2 spells bytes. ``zoneinfo.ZoneInfo`` is not here:
#: it pickles through ``builtins.getattr``, which would admit any attribute of an admitted class.
BASIC_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    [("builtins", name) for name in (*_BUILTINS, *_BUILTINS_2)]
    + [("datetime", name) for name in ("date", "datetime", "time", "timedelta", "timezone")]
    + [("collections", name) for name in ("OrderedDict", "Counter", "defaultdict", "deque")]
    + [
        ("decimal", "Decimal"),
        ("fractions", "Fraction"),
        ("uuid", "UUID"),
        ("uuid", "SafeUUID"),
        ("_codecs", "encode"),
    ]
)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickled payload names a global that ``safe-pickle`` does not admit."""


class UndecodableJob(PayloadError):
    """A job's payload cannot be decoded by this worker's serializer: refused, never run."""

    def __init__(self, message: str, reason: PayloadRefusal) -> None:
        super().__init__(message)
        self.reason: PayloadRefusal = reason


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, app: RqApp | None) -> None:
        super().__init__(io.BytesIO(data))
        self.app = app

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in BASIC_GLOBALS:
            return super().find_class(module, name)
        if self.app is None:
            raise RefusedGlobal(f"global '{module}.{name}' is not a basic type (no RqApp given)")
        try:
            return self.app.resolve_global(module, name)
        except TaskNotAllowed as exc:
            raise RefusedGlobal(f"global '{module}.{name}' refused: {exc}") from None


class SafePickleSerializer:
    """Reads pickle through a restricted Unpickler, and JSON; writes pickle (RQ's format).

    A global outside :data:`BASIC_GLOBALS` loads only when the bound :class:`RqApp` allows it
    (a registered task, a public class or function defined in an allowed module); anything else
    raises :class:`RefusedGlobal`. (A payload may call an allowed function while it loads; a
    Redis writer could enqueue that function anyway.) JSON payloads load too: a queue being
    migrated holds both.
    A class rather than an instance, bound with :meth:`bound_to`, because RQ's worker records
    its serializer by dotted name.
    """

    app: ClassVar[RqApp | None] = None

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def loads(cls, data: bytes) -> Any:
        if bytes(data[:1]) == PICKLE_PREFIX:
            return _SafeUnpickler(bytes(data), cls.app).load()
        return json.loads(bytes(data).decode("utf-8"))  # as RQ's JSONSerializer

    @classmethod
    def bound_to(cls, app: RqApp | None) -> type[SafePickleSerializer]:
        """This serializer, admitting what ``app`` allows."""
        bound = type("SafePickleSerializer", (cls,), {"app": app, "__module__": cls.__module__})
        return cast("type[SafePickleSerializer]", bound)


def _named(serializer: Any) -> Any:
    """The serializer ``serializer`` names: an argument, else ``$WORKERKIT_RQ_SERIALIZER``."""
    if serializer is None:
        serializer = os.environ.get(SERIALIZER_ENV) or "json"
        if serializer not in SERIALIZER_NAMES:
            raise ConfigurationError(
                f"{SERIALIZER_ENV}={serializer!r} is not a serializer: use one of "
                f"{'|'.join(SERIALIZER_NAMES)} (docs/engines/rq.md)"
            )
    return serializer


def resolve_rq_serializer(serializer: Any, app: RqApp | None = None) -> Any:
    """JSON unless ``safe-pickle``, pickle or a custom serializer is asked for by name or object.

    ``safe-pickle`` admits what ``app`` allows. Pickle and custom serializers log a warning:
    RQ's own default is pickle, which runs code chosen by anyone who can write to Redis.
    """
    serializer = _named(serializer)
    if serializer in ("json", JSONSerializer):
        return JSONSerializer
    if serializer == "safe-pickle" or (
        isinstance(serializer, type) and issubclass(serializer, SafePickleSerializer)
    ):
        return SafePickleSerializer.bound_to(app)
    resolved = resolve_serializer(serializer)
    if resolved is JSONSerializer:
        return JSONSerializer
    what = "pickle" if resolved is DefaultSerializer else f"the custom serializer {serializer!r}"
    log.warning(
        "jobs are deserialized with %s: anyone who can write to Redis can run code in this "
        "worker; use the JSON serializer (or safe-pickle to drain an old queue) unless every "
        "Redis writer is trusted",
        what,
        extra={"event": "unsafe_serializer", "serializer": str(serializer)},
    )
    return resolved


def serializer_for(job: Job, worker_serializer: Any) -> Any:
    """The serializer a job's results and meta are written with: the one it came in.

    Under ``safe-pickle`` a JSON job is answered in JSON (its producer reads JSON); otherwise
    the worker's own.
    """
    safe = isinstance(worker_serializer, type) and issubclass(
        worker_serializer, SafePickleSerializer
    )
    if safe and bytes(job.data[:1]) != PICKLE_PREFIX:
        return JSONSerializer
    return worker_serializer


def undecodable(job: Job, serializer: Any) -> UndecodableJob | None:
    """Why ``job``'s data or meta cannot be decoded with ``serializer``; None when both can.

    The data (function, instance, arguments) is decoded here, as it would be at once anyway.
    RQ replaces a meta it cannot load with ``{"unserialized": <the raw bytes>}``; that is
    loaded again for the reason.
    """
    try:
        job.func_name  # noqa: B018 - decodes the data
    except DeserializationError as exc:
        cause = exc.__cause__ or exc
        return _refusal(job, "data", job.data, serializer, cause)
    meta: object = job.meta  # RQ types it a dict; a hand-written hash may hold any JSON
    if not isinstance(meta, dict):
        return UndecodableJob(
            f"job {job.id}: its meta is {type(meta).__name__}, not a dict as RQ writes it; "
            "it was written into Redis by something other than RQ's enqueue",
            "undecodable",
        )
    raw = meta.get("unserialized") if len(meta) == 1 else None
    if isinstance(raw, bytes):
        try:
            serializer.loads(raw)
        except Exception as exc:
            return _refusal(job, "meta", raw, serializer, exc)
    return None


def _refusal(
    job: Job, part: str, payload: bytes, serializer: Any, cause: BaseException
) -> UndecodableJob:
    fix_producer = (
        "fix the producer: Queue(..., serializer=JSONSerializer) "
        "(from rq.serializers import JSONSerializer)"
    )
    if isinstance(cause, RefusedGlobal):
        return UndecodableJob(
            f"job {job.id}: its {part} names a global that --serializer safe-pickle refuses: "
            f"{cause}. safe-pickle loads only basic types and what the RqApp allows: add the "
            f"module to RqApp(modules=...) if it is yours, or {fix_producer}",
            "refused_global",
        )
    if serializer is JSONSerializer and bytes(payload[:1]) == PICKLE_PREFIX:
        return UndecodableJob(
            f"job {job.id}: its {part} was pickled (RQ's default serializer) and this worker "
            f"decodes JSON; {fix_producer}. To drain jobs already queued with pickle, run the "
            f"worker with --serializer safe-pickle ({SERIALIZER_ENV}=safe-pickle) until the "
            "queue is empty (docs/engines/rq.md, 'Migrating an existing app')",
            "pickled",
        )
    name = getattr(serializer, "__name__", type(serializer).__name__)
    return UndecodableJob(
        f"job {job.id}: its {part} cannot be decoded with {name} "
        f"({type(cause).__name__}: {cause}); the producer and the worker must use the same "
        "serializer (--serializer json|safe-pickle|pickle)",
        "undecodable",
    )
