"""Durable files (RELIABILITY.md T9, R8): a file appears under its name whole, or not at all.

Every file the engine keeps (a JSON report, the manifest, the journal, a pass's ranges file,
the migration log) is written as a temp file of this process's own beside its name, fsynced,
then given the name (a rename, or a hard link where a file already there must win), and the
directory is fsynced so that the name itself survives a power cut. One home for the sequence:
it was written out five times before (issue 13).

Errors are OSError: each caller names its file and its kind of failure (a StateIOError, exit 4,
for the state's files). A temp file is removed when the sequence fails, so a full file system
gets its space back.
"""

from __future__ import annotations

import os


def why(e: OSError) -> str:
    """An OSError in words, without the path (callers name the file themselves)."""
    return os.strerror(e.errno) if e.errno else str(e)


def write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """Write all of data (at offset, or at the file's position), looping on short writes, so
    that a full file system reports its ENOSPC instead of a short count."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if n <= 0:  # a regular file never does this; refuse to spin if one does
            raise OSError(0, f"write returned {n}")
        view = view[n:]
        if offset is not None:
            offset += n


def fsync_dir(path: str) -> None:
    """fsync the directory holding path: a new name in it is then durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A temp file name beside path that no other process (or call) uses."""
    return f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"


def _write_temp(path: str, data: bytes, mode: int) -> str:
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace (or create) path with data, durably: a reader sees the old file or the new one."""
    tmp = None
    try:
        tmp = _write_temp(path, data, mode)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path)
    finally:
        if tmp is not None:
            _unlink(tmp)


def create_new(path: str, data: bytes, mode: int = 0o600) -> bool:
    """Create path holding data, durably, unless a file appears there meanwhile (another
    process starting on the same fresh state): the hard link fails rather than replace it.
    True when this call created it."""
    tmp = None
    try:
        tmp = _write_temp(path, data, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path)
        return True
    finally:
        if tmp is not None:
            _unlink(tmp)


def replace(tmp: str, path: str) -> None:
    """Give the (already fsynced) file tmp the name path, durably."""
    os.replace(tmp, path)
    fsync_dir(path)
