"""``python -m workerkit.engines._rq``: the RQ worker process that ``workerkit run rq`` starts."""

from __future__ import annotations

from workerkit.engines.rq import main

if __name__ == "__main__":
    main()
