"""Durable on-disk result queue: the write-ahead log between inspection and the MQTT broker.

Every result is appended here and fsync'd *before* any attempt to send it, and is removed only after the
broker acknowledged it (PUBACK), so a broker outage or a SIGKILL of the service loses nothing and the
sender can always restart from the oldest unacknowledged record, in order.

On-disk layout of ``directory``::

    seg-<first index, 20 digits>.wal   append-only segments: an 8-byte magic, then records
    state.json                         {"head": H, "dropped": D}: records with index <= H are gone
                                       (acknowledged or dropped); replaced atomically
    lock                               flock'd while a DiskQueue has the directory open
    *.corrupt                          bytes quarantined at open (see below), kept for inspection

A record is ``uint32 length | uint32 crc32 | uint64 index | payload`` (big endian); the CRC covers the
index and the payload.  Indices increase strictly (also across restarts: the next index is one past the
largest of the last good record and the head; only the indices of records lost to a quarantine at the end
of the newest segment, never acknowledged, can be handed out again).  Segments roll over at
``segment_bytes``; a segment whose records are all at or below the head is deleted.

Recovery at open, per segment:

* a bad record (short header, length past the end of file, CRC mismatch) that is the *last thing* in the
  *last* segment, or followed only by zero bytes, is a torn write from a crash: it is truncated with a
  warning; everything before it is kept;
* any other bad record is corruption: reading that segment stops there, the rest of the segment is moved
  into ``<segment>.<offset>.corrupt`` (ERROR log with the byte count) and the segment is truncated.
  Later segments are framed independently and are still read, so only the quarantined span is lost.
  A file without the segment magic is moved whole to ``<segment>.corrupt``.

The bound ``max_bytes`` applies to the pending records (header included).  Appending past it drops the
oldest pending records first; this is counted in :attr:`DiskQueue.dropped` (persisted) and logged at
ERROR with the count (at most one line per 10 s while it goes on).  Disk use can exceed the bound by the
consumed part of the two segments at the ends (the oldest one still needed and the one appended to).

A disk that refuses a write (full: ENOSPC/EDQUOT, or an I/O error) does not lose the result: the half
record is cut off again and the record is *held in memory* with its index, and so is every later one
(the files must stay in index order), up to ``memory_max_bytes`` (beyond it the oldest held records are
dropped, counted in ``dropped``).  Held records are peeked and acknowledged like the others, so the
sender keeps delivering them in order while the disk is full; they are lost only if the process ends
before the disk takes them.  :meth:`DiskQueue.write_held` (the sender calls it on every pass; each
``append`` too) writes them out, oldest first, once the disk takes writes again, at most every
``_RETRY_S``.  :attr:`DiskQueue.disk_error` says why the disk refused, until a write succeeds again.  A
state file that cannot be written (head, drop count) is retried at the next acknowledgement; meanwhile
a restart would resend already delivered records (at least once, never lost).
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"WRQSEG01"
_HEADER = struct.Struct(">IIQ")
HEADER_BYTES = _HEADER.size
MAX_RECORD_BYTES = 16 * 1024 * 1024
_STATE = "state.json"
_DROP_LOG_INTERVAL_S = 10.0
_RETRY_S = 0.5  # how often held records are offered to a disk that refused a write
DEFAULT_MEMORY_MAX_BYTES = 16 << 20
_SEGMENT_PREFIX, _SEGMENT_SUFFIX = "seg-", ".wal"

_fdatasync = getattr(os, "fdatasync", os.fsync)


class QueueLockedError(RuntimeError):
    """Another DiskQueue (this or another process) has the directory open."""


@dataclass(eq=False)
class _Segment:
    path: Path
    fd: int
    size: int
    last: int  # largest index in the segment, -1 while empty


@dataclass(frozen=True)
class _Entry:
    index: int
    segment: _Segment
    offset: int  # of the payload
    length: int
    appended_mono: float | None = None  # time.monotonic() at append; None: recovered from a previous run

    @property
    def disk_bytes(self) -> int:
        return HEADER_BYTES + self.length


@dataclass(frozen=True)
class _Held:
    """A record the disk refused, kept in memory until it can be written."""

    index: int
    payload: bytes
    appended_mono: float

    @property
    def memory_bytes(self) -> int:
        return HEADER_BYTES + len(self.payload)


def _crc(index: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(index.to_bytes(8, "big")))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class DiskQueue:
    """Bounded, crash-safe FIFO of byte records with acknowledgement by index.

    Thread-safe; meant for one appending thread and one sending thread.  ``peek`` reads payloads with
    ``pread`` from an in-memory index of offsets, it never rescans files.
    """

    def __init__(self, directory: str | os.PathLike, max_bytes: int, segment_bytes: int | None = None,
                 memory_max_bytes: int = DEFAULT_MEMORY_MAX_BYTES) -> None:
        if max_bytes <= HEADER_BYTES:
            raise ValueError(f"max_bytes must exceed the {HEADER_BYTES}-byte record header, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.memory_max_bytes = int(memory_max_bytes)
        self.segment_bytes = int(segment_bytes or min(8 << 20, max(64 << 10, self.max_bytes // 16)))
        self._lock = threading.RLock()
        # Serialises state writes; taken *before* _lock (never inside it) so the slow fsyncs of an ack
        # do not hold up appends.
        self._state_lock = threading.Lock()
        self._persisted = (-1, 0)
        self._segments: list[_Segment] = []
        self._pending: collections.deque[_Entry] = collections.deque()
        self._bytes = 0
        self._head = -1
        self._next = 0
        self._dropped = 0
        self._drops_unlogged = 0
        self._drop_logged_at: float | None = None
        self._held: collections.deque[_Held] = collections.deque()  # after every _pending index, in order
        self._held_bytes = 0
        self._disk_error: str | None = None
        self._retry_at = 0.0
        self._state_error_logged_at: float | None = None
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise QueueLockedError(f"queue directory {self.directory} is in use by another DiskQueue") from None
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ public API

    @property
    def depth(self) -> int:
        """Records appended and neither acknowledged nor dropped (held in memory included)."""
        with self._lock:
            return len(self._pending) + len(self._held)

    @property
    def held(self) -> int:
        """Records kept in memory because the disk refused them (lost if the process ends now)."""
        with self._lock:
            return len(self._held)

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held_bytes

    @property
    def disk_error(self) -> str | None:
        """Why the last write failed (e.g. "No space left on device"); None once a write succeeded again."""
        with self._lock:
            return self._disk_error

    def oldest_appended_mono(self) -> float | None:
        """``time.monotonic()`` when the oldest pending record was appended; None when none is pending or it
        was recovered from a previous run (only its own timestamps can tell its age then)."""
        with self._lock:
            if self._pending:
                return self._pending[0].appended_mono
            return self._held[0].appended_mono if self._held else None

    @property
    def bytes(self) -> int:
        """On-disk size of the pending records, headers included (what ``max_bytes`` bounds)."""
        with self._lock:
            return self._bytes

    @property
    def dropped(self) -> int:
        """Records dropped unsent because the bound was reached (persists across restarts)."""
        with self._lock:
            return self._dropped

    @property
    def head(self) -> int:
        """Index of the last acknowledged-or-dropped record (-1: none yet)."""
        with self._lock:
            return self._head

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def next_index(self) -> int:
        """Index the next ``append`` will return."""
        with self._lock:
            return self._next

    def append(self, payload: bytes) -> int:
        """Write one record durably (fsync) and return its index; drops the oldest records if over the bound.

        A disk that refuses the write does not raise: the record is held in memory (see the module docstring)."""
        payload = bytes(payload)
        need = HEADER_BYTES + len(payload)
        if len(payload) > MAX_RECORD_BYTES or need > self.max_bytes:
            raise ValueError(f"record of {len(payload)} bytes does not fit the queue (max_bytes={self.max_bytes})")
        with self._lock:
            self._check_open()
            index = self._next
            now = time.monotonic()
            if self._held:
                self._write_held_locked(now)
            if self._held:  # still refused: later records wait behind the held ones
                self._hold(_Held(index, payload, now))
            else:
                try:
                    self._write_record(index, payload, now)
                except OSError as exc:
                    self._refused(exc, now)
                    self._hold(_Held(index, payload, now))
                else:
                    self._accepted(0)
            self._next = index + 1
            sync = self._dropped != self._persisted[1]
        if sync:
            self._sync_state()
        return index

    def write_held(self) -> int:
        """Offer the records held in memory to the disk again (at most every ``_RETRY_S``); returns how many are
        still held.  Cheap when none is held."""
        if not self._held:
            return 0
        with self._lock:
            if self._closed:
                return 0
            self._write_held_locked(time.monotonic())
            left = len(self._held)
            sync = self._dropped != self._persisted[1]
        if sync:
            self._sync_state()
        return left

    def peek(self, n: int, after: int | None = None) -> list[tuple[int, bytes]]:
        """The oldest ``n`` pending records (index, payload) in order; with ``after``, only indices above it."""
        out: list[tuple[int, bytes]] = []
        with self._lock:
            self._check_open()
            for entry in self._pending:
                if len(out) >= n:
                    break
                if after is not None and entry.index <= after:
                    continue
                data = os.pread(entry.segment.fd, entry.length, entry.offset)
                if len(data) != entry.length:
                    raise OSError(f"short read of record {entry.index} in {entry.segment.path}")
                out.append((entry.index, data))
            for held in self._held:
                if len(out) >= n:
                    break
                if after is None or held.index > after:
                    out.append((held.index, held.payload))
        return out

    def ack(self, index: int) -> None:
        """Everything up to and including ``index`` was delivered: persist that and free whole segments."""
        with self._lock:
            self._check_open()
            if index <= self._head:
                return
            if index >= self._next:
                raise ValueError(f"cannot acknowledge record {index}: the last appended is {self._next - 1}")
            self._consume_through(index)
        self._sync_state()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._held:
                self._retry_at = 0.0
                self._write_held_locked(time.monotonic())
            if self._held:
                log.error("result queue %s: closing with %d result(s) held in memory that the disk refused (%s): "
                          "they are lost (indices %d..%d)", self.directory, len(self._held), self._disk_error,
                          self._held[0].index, self._held[-1].index)
            self._closed = True
            for seg in self._segments:
                os.close(seg.fd)
            self._segments.clear()
            self._pending.clear()
            self._held.clear()
            self._held_bytes = 0
            os.close(self._lock_fd)

    def __enter__(self) -> DiskQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DiskQueue({str(self.directory)!r}, depth={len(self._pending)}, bytes={self._bytes})"

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _consume_through(self, index: int) -> int:
        n = 0
        while self._pending and self._pending[0].index <= index:
            self._bytes -= self._pending.popleft().disk_bytes
            n += 1
        while self._held and self._held[0].index <= index:  # delivered from memory: never needs the disk
            self._held_bytes -= self._held.popleft().memory_bytes
            n += 1
        self._head = max(self._head, index)
        return n

    def _write_record(self, index: int, payload: bytes, appended_mono: float) -> None:
        """Append one record to the newest segment and fdatasync it; on OSError nothing of it stays on disk."""
        need = HEADER_BYTES + len(payload)
        self._make_room(need)
        seg = self._segments[-1] if self._segments else None
        if seg is None or (seg.last >= 0 and seg.size + need > self.segment_bytes):
            seg = self._new_segment(index)
        record = _HEADER.pack(len(payload), _crc(index, payload), index) + payload
        try:
            _write_all(seg.fd, record)
            _fdatasync(seg.fd)
        except OSError:
            # Leave no half record behind (ENOSPC, EIO): the segment stays parseable.
            try:
                os.ftruncate(seg.fd, seg.size)
            except OSError:
                log.exception("could not roll back a failed append in %s", seg.path)
            raise
        self._pending.append(_Entry(index, seg, seg.size + HEADER_BYTES, len(payload), appended_mono))
        seg.size += need
        seg.last = index
        self._bytes += need

    def _refused(self, exc: OSError, now: float) -> None:
        why = exc.strerror or str(exc)
        if self._disk_error is None:
            log.error("result queue %s: the disk refused a write (%s): results are held in memory (not durable, "
                      "at most %g MB) until it takes them again", self.directory, why, self.memory_max_bytes / 2**20)
        self._disk_error = why
        self._retry_at = now + _RETRY_S

    def _accepted(self, written_from_memory: int) -> None:
        """A write went through: the disk is usable again."""
        if self._disk_error is not None:
            log.warning("result queue %s: the disk takes writes again (it refused them: %s); %d result(s) held in "
                        "memory are on disk now", self.directory, self._disk_error, written_from_memory)
            self._disk_error = None

    def _hold(self, held: _Held) -> None:
        self._held.append(held)
        self._held_bytes += held.memory_bytes
        n = 0
        while self._held_bytes > self.memory_max_bytes and len(self._held) > 1:
            self._held_bytes -= self._held.popleft().memory_bytes
            n += 1
        if n:
            self._dropped += n
            self._drops_unlogged += n
            self._log_drops(f"memory for results the disk refused is full (memory_max_bytes={self.memory_max_bytes})")

    def _write_held_locked(self, now: float) -> None:
        """Write held records to disk, oldest first, until one is refused (then retry after ``_RETRY_S``)."""
        if not self._held or now < self._retry_at:
            return
        written = 0
        while self._held:
            held = self._held[0]
            try:
                self._write_record(held.index, held.payload, held.appended_mono)
            except OSError as exc:
                self._refused(exc, now)
                break
            self._held.popleft()
            self._held_bytes -= held.memory_bytes
            written += 1
        if not self._held:
            self._accepted(written)

    def _make_room(self, need: int) -> bool:
        if self._bytes + need <= self.max_bytes:
            return False
        n = 0
        last = self._head
        while self._pending and self._bytes + need > self.max_bytes:
            entry = self._pending.popleft()
            self._bytes -= entry.disk_bytes
            last = entry.index
            n += 1
        self._head = max(self._head, last)
        self._dropped += n
        self._drops_unlogged += n
        self._log_drops(f"queue is full (max_bytes={self.max_bytes})")
        return True

    def _log_drops(self, why: str) -> None:
        now = time.monotonic()
        if self._drop_logged_at is None or now - self._drop_logged_at >= _DROP_LOG_INTERVAL_S:
            # Never silent, but one line per interval rather than one per frame while the broker is away.
            log.error("result queue %s: %s: dropped the %d oldest unsent record(s) since the last report, %d dropped "
                      "in all", self.directory, why, self._drops_unlogged, self._dropped)
            self._drop_logged_at, self._drops_unlogged = now, 0

    def _sync_state(self) -> None:
        """Persist head and drop count if they moved, then delete the segments that made obsolete."""
        with self._state_lock:
            with self._lock:
                if self._closed:
                    return
                state = (self._head, self._dropped)
            if state != self._persisted:
                try:
                    self._write_state(*state)
                except OSError as exc:
                    # e.g. a full disk: the next acknowledgement tries again; a restart meanwhile resends records
                    # that were delivered (never loses one).  Deleting consumed segments below frees space.
                    now = time.monotonic()
                    if self._state_error_logged_at is None or now - self._state_error_logged_at >= 10.0:
                        log.warning("result queue %s: cannot persist its state (%s); retrying at the next "
                                    "acknowledgement", self.directory, exc.strerror or exc)
                        self._state_error_logged_at = now
                else:
                    self._persisted = state
        with self._lock:
            if not self._closed:
                # the in-memory head: every record at or below it was delivered or dropped, persisted or not
                self._delete_consumed_segments(state[0])

    def _write_state(self, head: int, dropped: int) -> None:
        tmp = self.directory / (_STATE + ".tmp")
        data = json.dumps({"head": head, "dropped": dropped}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / _STATE)
        _fsync_dir(self.directory)

    def _new_segment(self, first: int) -> _Segment:
        path = self.directory / f"{_SEGMENT_PREFIX}{first:020d}{_SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _write_all(fd, MAGIC)
            _fdatasync(fd)
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        seg = _Segment(path, fd, len(MAGIC), -1)
        self._segments.append(seg)
        return seg

    def _delete_consumed_segments(self, head: int) -> None:
        """Delete sealed segments (not the one appended to) whose records are all at or below ``head``."""
        removed = False
        while len(self._segments) > 1 and self._segments[0].last <= head:
            seg = self._segments.pop(0)
            os.close(seg.fd)
            seg.path.unlink(missing_ok=True)
            removed = True
        if removed:
            _fsync_dir(self.directory)

    def _read_state(self) -> None:
        path = self.directory / _STATE
        if not path.exists():
            return
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            self._head = int(state["head"])
            self._dropped = int(state.get("dropped", 0))
            self._persisted = (self._head, self._dropped)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Replaced atomically, so this is not a crash artefact; resending everything beats losing it.
            log.error("result queue state %s is unreadable (%s): all records on disk are treated as unsent",
                      path, exc)

    def _recover(self) -> None:
        self._read_state()
        paths = sorted(p for p in self.directory.glob(f"{_SEGMENT_PREFIX}*{_SEGMENT_SUFFIX}")
                       if p.name[len(_SEGMENT_PREFIX):-len(_SEGMENT_SUFFIX)].isdigit())
        prev = -1
        for i, path in enumerate(paths):
            records = self._scan_segment(path, is_last=i == len(paths) - 1, prev=prev)
            if records is None:
                continue
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            seg = _Segment(path, fd, os.fstat(fd).st_size, records[-1][0] if records else -1)
            self._segments.append(seg)
            for index, offset, length in records:
                if index > self._head:
                    self._pending.append(_Entry(index, seg, offset, length))
                    self._bytes += HEADER_BYTES + length
            if records:
                prev = records[-1][0]
        # Empty sealed segments and fully consumed ones go; the newest is kept to append to.
        kept = []
        for j, seg in enumerate(self._segments):
            if j < len(self._segments) - 1 and seg.last <= self._head:
                os.close(seg.fd)
                seg.path.unlink(missing_ok=True)
            else:
                kept.append(seg)
        self._segments = kept
        self._next = max(prev, self._head) + 1
        if self._pending:
            log.info("result queue %s: %d record(s) pending from a previous run (indices %d..%d)",
                     self.directory, len(self._pending), self._pending[0].index, self._pending[-1].index)

    def _scan_segment(self, path: Path, is_last: bool, prev: int) -> list[tuple[int, int, int]] | None:
        """Validate one segment; returns (index, payload offset, length) of its good records, None if removed."""
        data = path.read_bytes()
        if data[: len(MAGIC)] != MAGIC:
            if is_last and len(data) < len(MAGIC) and MAGIC.startswith(data):
                log.warning("result queue: removing %s, torn while being created", path.name)
            else:
                target = path.with_name(path.name + ".corrupt")
                os.replace(path, target)
                log.error("result queue: %s is not a queue segment (bad magic): moved to %s, %d bytes lost",
                          path.name, target.name, len(data))
            path.unlink(missing_ok=True)
            _fsync_dir(self.directory)
            return None
        records: list[tuple[int, int, int]] = []
        pos = len(MAGIC)
        while pos < len(data):
            problem, may_be_torn, end = None, True, len(data)
            if len(data) - pos < HEADER_BYTES:
                problem = "torn record header"
            else:
                length, crc, index = _HEADER.unpack_from(data, pos)
                end = pos + HEADER_BYTES + length
                if length > MAX_RECORD_BYTES or end > len(data):
                    problem = f"record length {length} runs past the end of the segment"
                elif _crc(index, data[pos + HEADER_BYTES:end]) != crc:
                    problem = "CRC mismatch"
                elif index <= prev:
                    problem, may_be_torn = f"index {index} does not follow {prev}", False
            if problem is None:
                records.append((index, pos + HEADER_BYTES, length))
                prev = index
                pos = end
                continue
            # A crash mid-append can only damage the last record of the last segment (or leave zeros).
            rest = data[pos:]
            if is_last and may_be_torn and (end >= len(data) or not any(data[end:]) or not any(rest)):
                log.warning("result queue: truncating a torn record at the end of %s (offset %d, %d bytes: %s); "
                            "the %d records before it are kept", path.name, pos, len(rest), problem, len(records))
                with open(path, "r+b") as f:
                    f.truncate(pos)
                    os.fsync(f.fileno())
            else:
                self._quarantine(path, data, pos, problem)
            break
        return records

    def _quarantine(self, path: Path, data: bytes, pos: int, problem: str) -> None:
        target = path.with_name(f"{path.name}.{pos}.corrupt")
        with open(target, "wb") as f:
            f.write(data[pos:])
            os.fsync(f.fileno())
        with open(path, "r+b") as f:
            f.truncate(pos)
            os.fsync(f.fileno())
        _fsync_dir(self.directory)
        log.error("result queue: %s is corrupt at offset %d (%s): %d bytes moved to %s; records in them are lost",
                  path.name, pos, problem, len(data) - pos, target.name)
