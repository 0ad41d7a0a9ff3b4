"""The ``workerkit drill`` group: one command per engine, and ``local``."""

from __future__ import annotations

import click

from workerkit.drill.local import local_command
from workerkit.drill.options import ENGINES, engine_command

__all__ = ("drill",)


@click.group(context_settings={"max_content_width": 100})
def drill() -> None:
    """Test a rollout under load: canary jobs, counted from their own records."""


for _engine in ENGINES:
    drill.add_command(engine_command(_engine))
drill.add_command(local_command)
