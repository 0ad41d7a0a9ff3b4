"""A worker process for the idempotency tests: runs one idempotent task and journals what it did.

``python -m tests.support.idempotency_proc STORE KEY JOURNAL MODE [--go FILE] [--finish FILE]
[--ip S]``

``STORE`` is ``sql:<database url>`` or ``redis:<redis url>``. Each line of ``JOURNAL`` (this
process's own file) is a JSON object with ``pid`` and ``event``:

* ``ready``: started, store opened (written before waiting for ``--go``);
* ``running``: inside the task, the key claimed (``token`` is this run's owner token);
* ``deferred``: another live run held the key (the process retries every 20 ms);
* ``returned``: the call returned ``result`` (``ran`` says whether this process ran the body);
* ``claim_lost``: the run finished, but its completion was refused (taken over meanwhile).

Modes: ``race`` waits for the ``--go`` file, then calls the task (whose body takes 0.5 s) until
it returns; ``hold`` calls it at once, and the body waits for the ``--finish`` file (forever if
none: the test kills the process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from workerkit.errors import IdempotencyClaimLost, IdempotencyInProgress
from workerkit.idempotency import IdempotencyStore, idempotent

POLL = 0.002


def open_store(spec: str) -> IdempotencyStore:
    kind, _, url = spec.partition(":")
    if kind == "sql":
        from workerkit.idempotency.sql import SqlIdempotencyStore

        return SqlIdempotencyStore(url)
    from workerkit.idempotency.redis import RedisIdempotencyStore

    return RedisIdempotencyStore.from_url(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("key")
    parser.add_argument("journal", type=Path)
    parser.add_argument("mode", choices=("race", "hold"))
    parser.add_argument("--go", type=Path)
    parser.add_argument("--finish", type=Path)
    parser.add_argument("--ip", type=float, default=60.0)
    options = parser.parse_args(argv)

    journal = options.journal.open("a", buffering=1)

    def note(event: str, **fields: Any) -> None:
        journal.write(json.dumps({"pid": os.getpid(), "event": event, **fields}) + "\n")
        journal.flush()
        os.fsync(journal.fileno())

    store = open_store(options.store)
    ran = False

    @idempotent(
        key=lambda **_: options.key,
        store=store,
        name="tests.support.idempotency_proc.work",
        in_progress_expiry=options.ip,
        retention=3600,
    )
    def work(label: str) -> dict[str, Any]:
        nonlocal ran
        ran = True
        record = store.get(options.key)
        note("running", token=record.owner_token if record else None)
        if options.mode == "race":
            time.sleep(0.5)  # long enough for every other racer to find the key held
        else:
            while options.finish is None or not options.finish.exists():
                time.sleep(POLL)
        return {"by": os.getpid(), "label": label}

    note("ready")
    if options.go is not None:
        while not options.go.exists():
            time.sleep(POLL)
    while True:
        try:
            result = work("same")
        except IdempotencyInProgress as exc:
            note("deferred", retry_after=exc.retry_after)
            time.sleep(0.02)
            continue
        except IdempotencyClaimLost:
            note("claim_lost")
            return 3
        note("returned", result=result, ran=ran)
        return 0


if __name__ == "__main__":
    sys.exit(main())
