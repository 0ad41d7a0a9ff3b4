"""workerkit's Alembic migrations (run them with ``workerkit db upgrade``).

This is a package so that its ``env.py`` is installed with workerkit; revision scripts live in
``versions/`` and are package data.
"""

from __future__ import annotations
