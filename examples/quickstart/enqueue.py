"""Enqueue a batch of quickstart jobs: ``python -m examples.quickstart.enqueue [N]``."""

from __future__ import annotations

import sys

from examples.quickstart.app import charge_card, rebuild_report, send_receipt


def main(orders: int) -> None:
    for order_id in range(1, orders + 1):
        send_receipt.enqueue(order_id)
        charge_card.configure(job_id=f"charge-{order_id}").enqueue(order_id, 1999)
    rebuild_report.configure(job_id="report-daily").enqueue(pages=40)
    print(f"enqueued {orders * 2 + 1} jobs (enqueuing the same orders again is a no-op)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
