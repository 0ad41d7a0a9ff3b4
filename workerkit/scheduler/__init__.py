"""The leader-elected scheduler (DESIGN section 7): every fire time exactly once.

``contract`` holds what every part agrees on (a schedule, its trigger, the store's protocol);
the engines' stores live in ``engines/<engine>/scheduling.py``. The concepts page is
docs/concepts/scheduler.md.
"""

from __future__ import annotations

__all__ = ()
