"""The machine's shared timing lock: a benchmark that times anything holds it, so two timing jobs
never share the 2 cores (other jobs still may; the benchmarks say when they did)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager

LOCK = "/tmp/tightfit-timing.lock"


@contextmanager
def timing_lock() -> Iterator[None]:
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
