"""The leader-elected scheduler (DESIGN section 7): every fire time exactly once.

``contract`` holds what every part agrees on (a schedule, its trigger, the store's protocol);
``triggers`` the fire-time math (cron, every N seconds); ``plan`` and ``leadership`` the pure
arithmetic of what to fire and who leads; ``runner`` the loop; ``memory`` the in-memory store
for tests. The engines' stores live in ``engines/<engine>/scheduling.py``. The concepts page
is docs/concepts/scheduler.md.
"""

from __future__ import annotations

__all__ = ()
