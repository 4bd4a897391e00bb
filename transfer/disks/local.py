"""Local disks: a regular file or a block device, both roles; opening them, and what they are.

A block-device target is opened O_EXCL and the descriptor is held for the
whole run: the kernel then refuses a mount, and we are refused (EBUSY) when
it is mounted or claimed (RELIABILITY.md T5). Its whole aligned requests are
written through a second descriptor opened with O_DIRECT (see local_conn). A
regular file target is flock()ed instead (RELIABILITY.md P4).

An existing regular file with no data at all (SEEK_DATA finds none, as for a
PVC's fresh sparse disk.img) reads as zeroes, so zero runs are skipped on it
as on a file this run created.

The reads, writes and zeroing of a worker's connection are in local_conn.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Any

from .. import _native
from ..errors import BadInput, SourceError, TargetError, TargetRefused
from ..url import Address
from .base import Conn, Disk, Options
from .local_conn import LocalConn

MAX_CONNECTIONS = 8

_INPUT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                 errno.ELOOP, errno.ENAMETOOLONG, errno.EROFS}


def opener(addr: Address, role: str, options: Options) -> Disk:
    """open_disk for a local path: direct and kernels concern it."""
    return LocalDisk(addr, role, direct=options.direct, kernels=options.kernels)


def _sysfs(st: os.stat_result) -> str:
    return f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _loop_backing(st: os.stat_result) -> tuple | None:
    try:
        with open(_sysfs(st) + "/loop/backing_file") as f:
            backing = f.read().strip()
        b = os.stat(backing)
    except OSError:
        return None
    return ("inode", b.st_dev, b.st_ino)


def _mountpoint(st: os.stat_result) -> str | None:
    dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] == dev:
                    return fields[4]
    except OSError:
        pass
    return None


class LocalDisk(Disk):
    max_connections = MAX_CONNECTIONS

    def __init__(self, addr: Address, role: str, *, direct: bool = False,
                 kernels: _native.Kernels | None = None) -> None:
        self.path = addr.url
        self.direct_reads = False  # reads bypass the page cache (verification: what the disk holds)
        self.display = addr.display
        self.role = role
        self.kernels = kernels or _native.kernels()
        self.fd = -1
        self.direct_fd = -1
        self.writeback = False  # buffered writes pushed out as they go (regular files)
        self.sector = 512
        if role == "source":
            self._open_source(direct)
        else:
            self._open_target()

    def _error(self, what: str, e: OSError, cls: type | None = None) -> Exception:
        if cls is None:
            if e.errno in _INPUT_ERRNOS:
                cls = BadInput
            else:
                cls = SourceError if self.role == "source" else TargetError
        return cls(f"{what}: {os.strerror(e.errno) if e.errno else e}", disk=self.display,
                   errno=e.errno, kind=self.role)

    def _open_source(self, direct: bool) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self.st = os.fstat(self.fd)
        except OSError as e:
            raise self._error("cannot open the source", e) from None
        if direct:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here (tmpfs): the cache it is
                    raise self._error("cannot open the source", e) from None
            else:
                os.close(self.fd)
                self.fd = fd
                self.direct_reads = True
        if stat.S_ISREG(self.st.st_mode):
            self.kind = "file"
            self.size = self.st.st_size
            self.can_extents = True
        elif stat.S_ISBLK(self.st.st_mode):
            self.kind = "block"
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        else:
            self.close()
            raise BadInput("not a regular file or a block device", disk=self.display, kind="source")
        if self.size == 0:  # S9: 0 < size
            self.close()
            raise BadInput("the source is empty (0 bytes): nothing to copy", disk=self.display,
                           kind="source")

    def data_bytes(self) -> int:
        if self.kind == "file":  # allocated blocks: an upper bound of the data
            return min(self.size, self.st.st_blocks * 512)
        return self.size

    def _open_target(self) -> None:
        """Open only what was named (RELIABILITY.md X7): a symbolic link is followed only to a
        block device (/dev/disk/by-id/... names are links); a link to a file, or a dangling
        one, is refused, and a regular file is opened with O_NOFOLLOW, so a link put in its
        place meanwhile is not followed either."""
        try:
            st = os.lstat(self.path)
            if stat.S_ISLNK(st.st_mode):
                try:
                    st = os.stat(self.path)
                except FileNotFoundError:
                    raise TargetRefused("the target is a dangling symbolic link; name the file "
                                        "or device itself", disk=self.display) from None
                if not stat.S_ISBLK(st.st_mode):
                    raise TargetRefused("the target is a symbolic link to a file; name the file "
                                        "itself", disk=self.display)
        except FileNotFoundError:
            self.kind = "file"
            self.size = None  # created at the source's size by create()
            return
        except OSError as e:
            raise self._error("cannot stat the target", e) from None
        if stat.S_ISREG(st.st_mode):
            self.kind = "file"
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise TargetRefused("the target became a symbolic link; name the file "
                                        "itself", disk=self.display) from None
                raise self._error("cannot open the target", e) from None
            self._lock_file()
            self.st = os.fstat(self.fd)
            self.size = self.st.st_size
            self.zero_method = "punch-hole"
            self.reads_zero = self._all_hole()
            self.writeback = True
        elif stat.S_ISBLK(st.st_mode):
            self.kind = "block"
            self._open_block_target()
        else:
            raise BadInput("not a regular file or a block device", disk=self.display, kind="target")

    def _open_block_target(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise TargetRefused("the block device is in use (mounted, or held by another "
                                    "process or device)", disk=self.display) from None
            raise self._error("cannot open the target", e) from None
        try:
            self.st = os.fstat(self.fd)
            mounted = _mountpoint(self.st)
            if mounted:
                raise TargetRefused(f"the block device is mounted at {mounted}", disk=self.display)
            try:
                holders = os.listdir(_sysfs(self.st) + "/holders")
            except OSError:
                holders = []
            if holders:
                raise TargetRefused(f"the block device is held by {', '.join(holders)}",
                                    disk=self.display)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            self.sector = self.kernels.blksszget(self.fd)
            self._open_direct()
            self.zero_method = "blkzeroout"
        except OSError as e:
            self.close()
            raise self._error("cannot open the target", e) from None
        except BaseException:
            self.close()
            raise

    def _lock_file(self) -> None:
        """A regular file target is flock()ed for the run: a second engine writing it is
        refused (RELIABILITY.md P4; a block device gets the same from O_EXCL)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise TargetRefused("the target file is in use by another transfer (locked)",
                                disk=self.display) from None

    def _open_direct(self) -> None:
        """A second descriptor with O_DIRECT for aligned writes, where the file system has it."""
        try:
            self.direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here (tmpfs): buffered writes
                raise

    def _all_hole(self) -> bool:
        """True when the file has no data at all (SEEK_DATA finds none): it reads as zeroes.

        A file system without SEEK_DATA reports all of the file as data, so the answer is
        never wrongly True.
        """
        try:
            os.lseek(self.fd, 0, os.SEEK_DATA)
        except OSError as e:
            return e.errno == errno.ENXIO
        return False

    def create(self, size: int) -> None:
        """Create the missing target file at size; it then reads as zeroes."""
        try:
            # O_EXCL: never through a link, nor over a file that appeared meanwhile
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            self._lock_file()
            os.ftruncate(self.fd, size)
            self.st = os.fstat(self.fd)
        except OSError as e:
            raise self._error("cannot create the target", e) from None
        self.writeback = True
        self.size = size
        self.created = True
        self.reads_zero = True
        self.zero_method = "punch-hole"

    def connect(self) -> Conn | None:
        return LocalConn(self)

    def identities(self) -> set[tuple]:
        if self.fd < 0:
            return set()
        if self.kind == "file":
            return {("inode", self.st.st_dev, self.st.st_ino)}
        ids: set[tuple] = {("blockdev", self.st.st_rdev)}
        backing = _loop_backing(self.st)
        if backing:
            ids.add(backing)
        return ids

    def identity(self) -> dict[str, Any]:
        """The file's device and inode, or the block device's number (and a loop device's
        backing file), with the size: a state recorded for one target never matches another."""
        ident: dict[str, Any] = {"kind": self.kind, "uri": self.display,
                                 "path": os.path.abspath(self.path), "size": self.size}
        if self.fd < 0:
            return ident
        st = os.fstat(self.fd)
        if self.kind == "file":
            ident["dev"], ident["inode"] = st.st_dev, st.st_ino
        else:
            ident["rdev"] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            backing = _loop_backing(st)
            if backing:
                ident["loop_backing"] = list(backing[1:])
        return ident

    def signature(self) -> str | None:
        if self.created or self.fd < 0:
            return None
        from .probe import blkid_signature

        try:
            return blkid_signature(self.path)
        except RuntimeError as e:
            raise TargetRefused(str(e), disk=self.display) from None

    def close(self) -> None:
        for name in ("direct_fd", "fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
