"""An app module written the way users write one: it reads its configuration when imported.

Without ``DATABASE_URL`` in the environment, importing it raises ``KeyError: 'DATABASE_URL'``,
whichever engine is asked to load it (the error comes before ``app`` exists).
"""

from __future__ import annotations

import os

from workerkit import App

__all__ = ("DATABASE_URL", "app")

DATABASE_URL = os.environ["DATABASE_URL"]

app = App(DATABASE_URL)
