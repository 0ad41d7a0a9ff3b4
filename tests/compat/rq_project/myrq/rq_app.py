"""The one file a team adds to migrate to workerkit: the allowlist of what the worker may run.

The jobs themselves (myrq/jobs.py) are unchanged RQ jobs; ``import_rows`` is registered with its
timing facts (docs/engines/rq.md, "Migrating an existing app", step 1).
"""

from __future__ import annotations

from workerkit.engines.rq import RqApp

__all__ = ("app",)

app = RqApp(modules=["myrq.jobs"])
