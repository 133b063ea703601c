"""
rerankd's event-sourced core: event schema, the SQLite append-only log, the pure
fold, the state arrays, snapshots, group commit and dataset importers.

It imports nothing else of rerankd (DESIGN.md, import direction): no asyncio, no JAX.
"""

from eventstore._config import DEFAULT_WEIGHTS, FoldConfig
from eventstore._errors import (
    CorruptSnapshotError,
    EventRejectedError,
    SchemaVersionError,
    StoreError,
    StoreFullError,
)
from eventstore.committer import BackpressureError, GroupCommitter
from eventstore.fold import apply, project
from eventstore.log import AppendResult, EventLog
from eventstore.schema import (
    EVENT_TYPES,
    DecodeResult,
    Event,
    EventDecoder,
    Limits,
    Rejection,
)
from eventstore.snapshots import SnapshotStore
from eventstore.state import State
from eventstore.store import IngestResult, Store

__all__ = [
    "DEFAULT_WEIGHTS",
    "EVENT_TYPES",
    "AppendResult",
    "BackpressureError",
    "CorruptSnapshotError",
    "DecodeResult",
    "Event",
    "EventDecoder",
    "EventLog",
    "EventRejectedError",
    "FoldConfig",
    "GroupCommitter",
    "IngestResult",
    "Limits",
    "Rejection",
    "SchemaVersionError",
    "SnapshotStore",
    "State",
    "Store",
    "StoreError",
    "StoreFullError",
    "apply",
    "project",
]
