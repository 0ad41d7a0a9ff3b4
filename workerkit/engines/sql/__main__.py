"""``python -m workerkit.engines.sql``: the sql engine's worker, as the supervisor starts it."""

from __future__ import annotations

from workerkit.engines.sql.startup import main

__all__ = ()

if __name__ == "__main__":
    main()
