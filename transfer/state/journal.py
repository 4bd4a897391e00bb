"""An append-only journal of checksummed, sequence-numbered records (RELIABILITY.md R5-R8).

    file    = MAGIC record*
    record  = u32le length | u64le seq | payload (length bytes of JSON) | u64le xxh3_64(all before)

- A record is written (one write(2), more only after a short write) and
  fsynced: once append() returns, it is durable (R5 step 3). The file is
  created as a temp file of a name of its own, fsynced, hard-linked to its
  name (which never replaces a journal another engine created meanwhile)
  and its directory fsynced, so it exists whole or not at all (T9, R8).
- The file system failing under it (ENOSPC, EIO, a failed fsync) raises
  StateIOError (exit 4), never a traceback: what the journal held before
  stays, a record cut short is a torn tail the next open discards, and a
  journal whose append failed takes no more appends (R6: never retried).
- Sequence numbers start at 1 and grow by one; a gap is corruption.
- A torn tail, a last record cut short or failing its checksum where the
  file ends (or zeroes there), is what a crash mid-append leaves: it is
  discarded (the file is truncated to the last good record, and `discarded`
  says how many bytes) and the work it claimed is redone (R4). A record that
  fails its checksum, its sequence number or its JSON with more records after
  it is not a torn tail: the journal is refused as corrupt, never read past
  (R7, P5). Nor is a length field that is absurd, or that runs past the end
  of the file over a valid later record: forgetting records is not harmless
  (a dropped begin record forgets the ranges its pass left tainted).
- The journal is locked (flock, exclusive, non-blocking) while open: a second
  engine on the same state is refused (R8), and it is read only under that
  lock, so never while another engine writes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
from typing import Any

import xxhash

from ..durable import create_new, write_all
from ..durable import why as why_failed
from ..errors import BadInput, StateIOError

MAGIC = b"TRJOURN1"
_HEAD = struct.Struct("<IQ")
_SUM = struct.Struct("<Q")
MAX_RECORD = 16 << 20  # a larger declared length is garbage, not a record


class JournalError(BadInput):
    kind = "journal"


def encode(seq: int, record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    body = _HEAD.pack(len(payload), seq) + payload
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


class Journal:
    def __init__(self, path: str, fd: int, records: list[dict[str, Any]], discarded: int) -> None:
        self.path = path
        self._fd = fd
        self.records = records
        self.discarded = discarded  # bytes of torn tail dropped when opened
        self._failed: str | None = None  # why an append failed: no more appends (R6)

    @classmethod
    def open(cls, path: str, *, create: bool = True) -> "Journal":
        """Open (creating it when allowed and missing), lock, read and validate the journal."""
        if not os.path.exists(path):
            if not create:
                raise JournalError("does not exist", disk=path)
            _create(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            raise JournalError(f"cannot open: {why_failed(e)}", disk=path) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalError("in use by another engine (locked): it holds this state "
                                   "until it ends", disk=path) from None
            records, good_end, size = _read(fd, path)
            if good_end < size:  # a torn tail: drop it, durably, before appending after it
                try:
                    os.ftruncate(fd, good_end)
                    os.fsync(fd)
                except OSError as e:
                    raise StateIOError(f"cannot drop the torn tail: {why_failed(e)}", disk=path,
                                       kind="journal") from None
            return cls(path, fd, records, size - good_end)
        except BaseException:
            os.close(fd)
            raise

    def append(self, record: dict[str, Any]) -> int:
        """Write the record and fsync; return its sequence number. A failure is final (R6):
        the journal takes no more appends, and the record (maybe written in part, a torn tail
        the next open discards) is not in self.records."""
        if self._failed is not None:
            raise StateIOError(f"append refused after an earlier failure ({self._failed})",
                               disk=self.path, kind="journal")
        seq = len(self.records) + 1
        data = encode(seq, record)
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as e:
            self._failed = why_failed(e)
            raise StateIOError(f"append failed: {self._failed}", disk=self.path,
                               kind="journal") from None
        self.records.append(record)
        return seq

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing releases the lock
            self._fd = -1

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create(path: str) -> None:
    """Create an empty journal at path unless one appears there meanwhile (another engine
    starting on the same fresh state): a temp file of this process's own, made durable, then
    hard-linked to path, which fails rather than replace what is there (transfer.durable)."""
    try:
        create_new(path, MAGIC)
    except PermissionError as e:  # the operator's to fix, before anything was written
        raise JournalError(f"cannot create: {why_failed(e)}", disk=path) from None
    except OSError as e:
        raise StateIOError(f"cannot create: {why_failed(e)}", disk=path, kind="journal") from None


def _read(fd: int, path: str) -> tuple[list[dict[str, Any]], int, int]:
    """(records, end of the last good record, file size); JournalError on corruption."""
    try:
        size = os.fstat(fd).st_size
        chunks, pos = [], 0
        while pos < size:
            chunk = os.pread(fd, size - pos, pos)
            if not chunk:
                break  # shrank under us: only a torn-tail truncation does that, under the lock
            chunks.append(chunk)
            pos += len(chunk)
    except OSError as e:
        raise StateIOError(f"cannot read: {why_failed(e)}", disk=path, kind="journal") from None
    data = b"".join(chunks)
    size = len(data)
    if data[: len(MAGIC)] != MAGIC:
        raise JournalError("not a journal (wrong magic)", disk=path)
    records: list[dict[str, Any]] = []
    pos = len(MAGIC)
    while pos < size:
        end, record, why = _parse(data, pos, len(records) + 1)
        if why is not None:
            # a bad record is a torn tail only if the file ends with it, and nothing valid follows
            if ((end is None or end >= size or not data[pos:].strip(b"\0"))
                    and _torn(data, pos, len(records) + 1)):
                return records, pos, size
            raise JournalError(f"corrupt at record {len(records) + 1} (byte {pos}): {why}",
                               disk=path)
        records.append(record)
        pos = end
    return records, pos, size


def _torn(data: bytes, pos: int, seq: int) -> bool:
    """Can data[pos:] be what a crash during one append left: a prefix of one record, or zeroes
    (a file system that grew the file before its data reached the disk)?

    Not when the declared length is absurd (a prefix carries the true length), nor when a valid
    record of a later sequence number lies further on: that is a corrupted length field hiding
    records (RELIABILITY.md P5), and reading it as a torn tail would drop them silently.
    """
    tail = data[pos:]
    if not tail.strip(b"\0"):
        return True
    if len(tail) >= _HEAD.size and _HEAD.unpack_from(tail)[0] > MAX_RECORD:
        return False
    for p in range(pos + 1, len(data) - _HEAD.size - _SUM.size + 1):
        length, got = _HEAD.unpack_from(data, p)
        if seq < got <= seq + 1_000_000 and length <= MAX_RECORD:
            end = p + _HEAD.size + length + _SUM.size
            if end <= len(data) and xxhash.xxh3_64_intdigest(data[p : end - _SUM.size]) == \
                    _SUM.unpack_from(data, end - _SUM.size)[0]:
                return False
    return True


def _parse(data: bytes, pos: int, seq: int) -> tuple[int | None, Any, str | None]:
    """(end, record, None) for a good record at pos; (end or None, None, why) for a bad one."""
    if pos + _HEAD.size > len(data):
        return None, None, "cut short"
    length, got_seq = _HEAD.unpack_from(data, pos)
    if length > MAX_RECORD:
        return None, None, f"record length {length}"
    end = pos + _HEAD.size + length + _SUM.size
    if end > len(data):
        return None, None, "cut short"
    body = data[pos : end - _SUM.size]
    if xxhash.xxh3_64_intdigest(body) != _SUM.unpack_from(data, end - _SUM.size)[0]:
        return end, None, "checksum mismatch"
    if got_seq != seq:
        return end, None, f"sequence {got_seq}, expected {seq}"
    try:
        record = json.loads(body[_HEAD.size :])
    except ValueError:
        return end, None, "payload is not JSON"
    if not isinstance(record, dict):
        return end, None, "payload is not an object"
    return end, record, None
