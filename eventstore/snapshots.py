"""
Snapshots of the state: atomic files with the offset they cover and a checksum.

A snapshot file is ``MAGIC | offset (8 bytes LE) | payload | SHA-256(everything
before)``, where the payload is :meth:`State.to_bytes`. It is written to a temporary
file, fsynced, renamed into place and the directory fsynced, so a crash leaves
either the old set of snapshots or the new one, never half a file under a real
name. On restore a file whose checksum, structure or configuration does not match
is skipped with a warning and the next older one is tried: a snapshot is never
trusted, only verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Final

import structlog

from eventstore._config import FoldConfig
from eventstore._errors import CorruptSnapshotError
from eventstore.state import State

__all__ = ["SnapshotStore"]

MAGIC: Final = b"RRKSNAP1"
_DIGEST: Final = 32
_log = structlog.get_logger("eventstore.snapshots")


class SnapshotStore:
    """
    A directory of snapshot files, newest kept.

    Args:
        directory: where the files live (created when missing).
        keep: how many of the newest snapshots to keep after each write.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = max(keep, 1)

    def paths(self) -> list[Path]:
        """Snapshot files, newest (highest offset) first."""
        return sorted(self.directory.glob("snapshot-*.snap"), reverse=True)

    def offsets(self) -> list[int]:
        """The offsets the snapshot files cover, read from their names, newest first."""
        out: list[int] = []
        for path in self.paths():
            digits = path.stem.removeprefix("snapshot-")
            if digits.isdigit():
                out.append(int(digits))
        return out

    def write(self, state: State) -> Path:
        """Write ``state`` atomically; older files beyond ``keep`` are removed."""
        body = MAGIC + state.offset.to_bytes(8, "little") + state.to_bytes()
        data = body + hashlib.sha256(body).digest()
        final = self.directory / f"snapshot-{state.offset:020d}.snap"
        tmp = self.directory / f".{final.name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(final)
        except BaseException:
            # disk full or read-only: give the space of the partial file back at once
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        self._prune(keep=self.keep)
        return final

    def _prune(self, *, keep: int) -> None:
        for old in self.paths()[keep:]:
            old.unlink(missing_ok=True)
        for tmp in self.directory.glob(".snapshot-*.tmp"):
            tmp.unlink(missing_ok=True)

    def drop_all_but_newest(self) -> None:
        """Remove every snapshot except the newest (after an erasure rewrote it)."""
        self._prune(keep=1)
        _fsync_dir(self.directory)

    def load(self, path: Path, config: FoldConfig) -> State:
        """
        Read and verify one snapshot.

        Raises:
            CorruptSnapshotError: bad checksum, truncated, or made under another config.
        """
        data = path.read_bytes()
        if len(data) < len(MAGIC) + 8 + _DIGEST or not data.startswith(MAGIC):
            raise CorruptSnapshotError(str(path), "not a snapshot (bad magic or truncated)")
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        if hashlib.sha256(body).digest() != digest:
            raise CorruptSnapshotError(str(path), "checksum mismatch (partial or damaged file)")
        offset = int.from_bytes(body[len(MAGIC): len(MAGIC) + 8], "little")
        try:
            state = State.from_bytes(body[len(MAGIC) + 8:], config)
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptSnapshotError(str(path), str(e)) from e
        if state.offset != offset:
            raise CorruptSnapshotError(str(path), "offset in header and payload differ")
        return state

    def newest_valid(self, config: FoldConfig) -> State | None:
        """The newest snapshot that verifies, or ``None``; bad ones are skipped with a warning."""
        for path in self.paths():
            try:
                return self.load(path, config)
            except (CorruptSnapshotError, OSError) as e:
                _log.warning("snapshot_skipped", path=str(path), reason=str(e))
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
