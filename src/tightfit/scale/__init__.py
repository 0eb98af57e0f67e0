"""Scale-out and durability: several worker processes on one study in a shared database storage
(PostgreSQL, MySQL, SQLite for one machine), heartbeats so a dead worker's trial is retried.

``open_storage(url)`` builds the storage, ``work(model, storage=..., **compress_arguments)`` runs a
worker in this process; ``tightfit worker`` and ``tightfit run --workers N`` are the CLI.
"""

from typing import Any

from .storage import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, RetryStaleTrial, open_storage, redact

__all__ = ["GRACE_PERIOD_S", "HEARTBEAT_INTERVAL_S", "RetryStaleTrial", "open_storage", "redact", "work"]


def __getattr__(name: str) -> Any:
    # Lazy: the worker imports compress, which imports the search loop, which imports .storage.
    if name == "work":
        from .worker import work

        return work
    raise AttributeError(name)
