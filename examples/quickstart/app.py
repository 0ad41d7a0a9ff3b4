"""The quickstart app: three jobs that behave the way real ones do.

* ``send_receipt`` is quick.
* ``rebuild_report`` is slow and checkpointed: stop it (Ctrl-C, a deploy) and the next attempt
  resumes from the last page it saved instead of starting over.
* ``charge_card`` fails on its first attempt (a flaky payment gateway) and succeeds on retry.

Run it with ``./scripts/quickstart.sh`` from the repository root.
"""

from __future__ import annotations

import logging
import time

import workerkit
from workerkit import current_job

app = workerkit.App()
log = logging.getLogger("quickstart")


@app.task(queue="default", timeout=10)
def send_receipt(order_id: int) -> str:
    time.sleep(0.2)  # render and send an e-mail
    return f"receipt for order {order_id} sent"


@app.task(queue="default", timeout=120, checkpointed=True)
def rebuild_report(pages: int) -> dict[str, int]:
    job = current_job()
    done = (job.checkpoint or {}).get("page", 0)
    if done:
        log.info("resuming report at page %d of %d", done, pages, extra={"event": "resume"})
    while done < pages:
        if job.stop_requested:
            job.release({"page": done})  # back to the queue; the next attempt resumes here
        time.sleep(0.5)  # one page of work
        done += 1
        job.save_checkpoint({"page": done})
    return {"pages": pages}


@app.task(queue="default", timeout=10, max_attempts=3, retry_backoff=1.0)
def charge_card(order_id: int, amount_cents: int) -> str:
    if current_job().attempt == 1:
        raise ConnectionError("payment gateway timed out")
    return f"charged {amount_cents} cents for order {order_id}"
