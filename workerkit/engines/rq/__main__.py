"""``python -m workerkit.engines.rq``: the RQ worker process that ``workerkit run rq`` starts."""

from __future__ import annotations

from workerkit.engines.rq.worker import main

__all__ = ()

if __name__ == "__main__":
    main()
