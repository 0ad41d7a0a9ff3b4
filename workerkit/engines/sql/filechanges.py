"""Writes to a SQLite database's files, as the kernel reports them (Linux inotify).

SQLite has no notifications. A commit by another process (an enqueue) writes the database's
write-ahead log (``NAME-wal``), or in a rollback-journal mode the file itself and its
``NAME-journal``: :class:`FileChanges` watches the directory for writes to those three names
and makes a descriptor readable when one comes, so an idle worker's thread can sleep in
``poll`` until then instead of reading the data version every few milliseconds. The directory,
not the files: the log and the journal come and go (SQLite deletes the log when its last
connection closes, and a journal at each commit in DELETE mode), and a file swapped in by a
rename is seen too.

What it cannot see, and so why the caller still looks now and then: writes through another
kernel (a network filesystem, on which SQLite's locking is not safe either), and a watch the
kernel dropped (the directory removed: ``IN_IGNORED``, reported as a change, then
:attr:`FileChanges.lost`). An overflowed event queue (``IN_Q_OVERFLOW``) is reported as a
change. Writes through shared memory (``NAME-shm``, the WAL index) raise no event, and need
none: a commit always writes the log.

Without inotify (not Linux, no libc, the per-user limit of watches reached),
:meth:`FileChanges.open` returns None and the caller polls.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import weakref
from pathlib import Path
from typing import Final

from workerkit.proctree import load_libc

__all__ = ("FileChanges",)

# <sys/inotify.h>
_IN_MODIFY: Final = 0x00000002
_IN_CLOSE_WRITE: Final = 0x00000008
_IN_MOVED_TO: Final = 0x00000080
_IN_CREATE: Final = 0x00000100
_IN_DELETE: Final = 0x00000200
_IN_Q_OVERFLOW: Final = 0x00004000
_IN_IGNORED: Final = 0x00008000
_IN_ONLYDIR: Final = 0x01000000
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = 0o2000000  # O_CLOEXEC on Linux
_WATCHED: Final = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
# struct inotify_event { int wd; uint32_t mask, cookie, len; char name[len]; }
_HEADER: Final = struct.Struct("iIII")


class FileChanges:
    """A readable descriptor (:meth:`fileno`) once one of the database's files was written."""

    def __init__(self, fd: int, names: frozenset[bytes]) -> None:
        self._fd = fd
        self._names = names
        #: The kernel dropped the watch: no more events will come.
        self.lost = False
        # Closed with the object too: a forked child drops its parent's watcher thread, and
        # with it the last reference to this.
        self._finalizer = weakref.finalize(self, _close, fd)

    @classmethod
    def open(cls, database: str) -> FileChanges | None:
        """Watch the files of the SQLite database at path ``database``; None where inotify
        is not available (the caller polls)."""
        libc = load_libc()
        if not libc or not hasattr(libc, "inotify_init1"):
            return None
        path = Path(database).absolute()
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return None
        directory = os.fsencode(path.parent)
        if libc.inotify_add_watch(fd, ctypes.c_char_p(directory), _WATCHED | _IN_ONLYDIR) < 0:
            os.close(fd)  # ENOSPC: max_user_watches reached; ENOENT: no directory (yet)
            return None
        name = os.fsencode(path.name)
        return cls(fd, frozenset({name, name + b"-wal", name + b"-journal"}))

    def fileno(self) -> int:
        return self._fd

    def take(self) -> bool:
        """Read every pending event; True when one may mean a commit (a write to one of the
        database's files, an overflowed queue, the watch lost)."""
        changed = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return changed
            except OSError:
                self.lost = True
                return True
            if not data:
                return changed
            changed |= self._parse(data)

    def _parse(self, data: bytes) -> bool:
        changed = False
        offset = 0
        while offset + _HEADER.size <= len(data):
            _wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            name = data[offset + _HEADER.size : offset + _HEADER.size + length].rstrip(b"\0")
            offset += _HEADER.size + length
            if mask & _IN_IGNORED:
                self.lost = True
            if mask & (_IN_Q_OVERFLOW | _IN_IGNORED) or name in self._names:
                changed = True
        return changed

    def close(self) -> None:
        self._finalizer()
        self._fd = -1


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
