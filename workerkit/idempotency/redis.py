"""Idempotency records in Redis: one hash per key, every change one Lua script.

A script runs atomically on the server, so claim, complete and forget each read and write the
record in one step, with no race between workers; times come from the server's ``TIME``. The
scripts are the .lua files next to this module, registered with redis-py's ``register_script``
(sent by hash, loaded again when the server lost its script cache). Redis deletes a completed
record after R and a claim after 2 x Ip. See docs/howto/idempotent-tasks.md.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, cast

import redis
from redis import exceptions as redis_errors

from workerkit.errors import StoreError, StoreUnavailable
from workerkit.idempotency.contract import Claim, IdempotencyRecord, check_seconds, log_fenced_out

if TYPE_CHECKING:
    from redis.commands.core import Script

__all__ = ("DEFAULT_PREFIX", "RedisIdempotencyStore")

log = logging.getLogger(__name__)

#: Prepended to every key (a Redis shared with other applications keeps them apart).
DEFAULT_PREFIX: Final = "workerkit:idempotency:"
#: Retries of a claim that met a broken connection (0.05 s doubling: 1.55 s in all).
CLAIM_RETRIES: Final = 5


def _script(name: str) -> str:
    return resources.files("workerkit.idempotency").joinpath(name).read_text(encoding="utf-8")


_CLAIM: Final = _script("claim.lua")
_COMPLETE: Final = _script("complete.lua")
_FORGET: Final = _script("forget.lua")
_GET: Final = _script("get.lua")


def _ms(seconds: float) -> int:
    # Rounded up and at least 1: a claim for 0.0004 s must still be a claim.
    return max(1, math.ceil(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisIdempotencyStore:
    """:class:`~workerkit.idempotency.IdempotencyStore` on Redis (redis-py; Redis 5 or later).

    Give it a client (``decode_responses`` either way) or use :meth:`from_url`. Safe to share
    between threads; redis-py's pool also notices a fork and opens new connections in the child.
    """

    def __init__(self, client: redis.Redis[Any], *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._owns_client = False
        self._claim: Script = client.register_script(_CLAIM)
        self._complete: Script = client.register_script(_COMPLETE)
        self._forget: Script = client.register_script(_FORGET)
        self._get: Script = client.register_script(_GET)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> RedisIdempotencyStore:
        """A store with its own client on ``url`` (``redis://HOST:PORT/DB``); closed by close()."""
        client: redis.Redis[Any] = redis.Redis.from_url(
            url, socket_connect_timeout=10, socket_timeout=30, health_check_interval=30
        )
        store = cls(client, prefix=prefix)
        store._owns_client = True
        return store

    def __repr__(self) -> str:
        return f"<RedisIdempotencyStore prefix={self.prefix!r}>"

    def _call(self, script: Script, key: str, *args: str | int, retries: int = 0) -> Any:
        delay = 0.05
        while True:
            try:
                return script(keys=[self.prefix + key], args=list(args))
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                if retries <= 0:
                    message = f"redis unavailable: {type(exc).__name__}: {exc}"
                    raise StoreUnavailable(message) from exc
            except redis_errors.RedisError as exc:
                raise StoreError(f"idempotency store: redis: {type(exc).__name__}: {exc}") from exc
            retries -= 1
            time.sleep(delay)  # the next try reconnects
            delay *= 2

    def claim(self, key: str, fingerprint: str, *, in_progress_expiry: float) -> Claim:
        """Claim ``key``, or report the live record that holds it (one script run)."""
        check_seconds("in_progress_expiry", in_progress_expiry)
        token = secrets.token_hex(16)
        # Retried: a killed connection (a failover, a proxy's restart) must not fail a job
        # whose body has not run yet. A lost reply of a try that landed makes the next one
        # find the key held (in_progress): the job waits for the claim to expire, never runs
        # twice. complete() is not retried here: the body ran, and the job's lease may end.
        reply = self._call(
            self._claim, key, fingerprint, token, _ms(in_progress_expiry), retries=CLAIM_RETRIES
        )
        outcome, value = _text(reply[0]), _text(reply[1])
        if outcome in ("claimed", "taken_over"):
            return Claim(cast(Any, outcome), token=value)
        if outcome == "replay":
            return Claim("replay", result_json=value)
        if outcome == "mismatch":
            return Claim("mismatch")
        return Claim("in_progress", retry_after=int(value) / 1000)

    def complete(self, key: str, token: str, result_json: str, *, retention: float) -> bool:
        """Record the result for ``retention`` seconds; False when ``token`` lost the key."""
        check_seconds("retention", retention)
        done = bool(self._call(self._complete, key, token, result_json, _ms(retention)))
        if not done:
            log_fenced_out(log, key)
        return done

    def forget(self, key: str, token: str) -> bool:
        """Delete the claim ``token`` holds; False when it holds none."""
        return bool(self._call(self._forget, key, token))

    def get(self, key: str) -> IdempotencyRecord | None:
        """The record of ``key`` (expired claims included, until Redis drops them), or None."""
        reply = self._call(self._get, key)
        if reply is None:
            return None
        state, fp, token, result, remaining, takeovers = (_text(part) for part in reply)
        return IdempotencyRecord(
            key=key,
            state=cast(Any, state),
            fingerprint=fp,
            owner_token=token,
            result_json=result if state == "completed" else None,
            expires_in=int(remaining) / 1000,
            takeovers=int(takeovers),
        )

    def close(self) -> None:
        """Close the client (when this store made it)."""
        if self._owns_client:
            self.client.close()
