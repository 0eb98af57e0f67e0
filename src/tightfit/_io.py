"""Atomic, durable file writes: a reader (or a process resuming after a crash or a power cut) sees
the old file or the new one, never half of one.

Every file tightfit writes for a user to read back (``.tfz`` files, ``summary.json``,
``trials.csv``, ``trials.png``, ``example_input.pt``, prune-and-adjust's rounds) goes through
:func:`write_atomic`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Temporary files start with this, so that nothing (a glob for ``*.tfz``, a user) mistakes one left
#: by a killed write for the target; they end in ``.tmp`` for the same reason.
TEMP_PREFIX = ".tightfit-"


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path``: into a uniquely named temporary file in the same directory (two
    writers never share one), ``fsync`` it, rename it over ``path`` (``os.replace`` is atomic on
    POSIX and Windows), then ``fsync`` the directory so the rename itself survives a power cut.
    A kill at any moment leaves ``path`` as it was or complete; at worst a stray temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would have given 0666 - umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where a directory cannot be opened (and renames need no fsync)
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    # os.umask only reads by setting: set and restore once, at import (before any worker threads)
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _umask() -> int:
    return _UMASK


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))
