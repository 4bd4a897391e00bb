"""A host-local lock on an NBD target, held for the run (RELIABILITY.md P4, R8).

A file target is flock()ed and a block device opened O_EXCL, so a second
engine writing either is refused; an NBD export cannot be locked through the
protocol. So before an NBD target is opened for writing, a lock file named by
the export's identity is flock()ed (exclusive, non-blocking) and held until
the run ends: a second engine on this host writing the same export, from
another state directory or as a plain copy, is refused with TargetRefused
(exit 2) before it writes anything.

The identity: for a unix socket, the socket file's device and inode (however
the path is spelled) and the export name; for TCP, the host as written
(lowercased), the port (default 10809) and the export name. The lock file is
sha256 of that, in $TRANSFER_LOCK_DIR or /run/lock/transfer (created sticky and
world-writable, like /run/lock, so engines of several users share it). Its
limits: it sees only engines on this host using the same lock directory, and
two spellings of one TCP server (a name and its address) are two identities.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import urllib.parse

from ..errors import BadInput, TargetRefused
from ..url import parse

LOCK_DIR = "/run/lock/transfer"
NBD_PORT = 10809


class TargetLock:
    """A held lock; close() releases it (so does the process ending)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_directory() -> str:
    return os.environ.get("TRANSFER_LOCK_DIR") or LOCK_DIR


def identity(url: str) -> str | None:
    """The NBD export's identity (see the module docstring); None for a target of another
    kind, or an address open_disk will refuse with its own message."""
    try:
        addr = parse(url)
    except BadInput:
        return None
    if addr.kind != "nbd":
        return None
    parts = urllib.parse.urlsplit(url)
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if parts.scheme.lower().endswith("+unix"):
        sock = dict(urllib.parse.parse_qsl(parts.query)).get("socket", "")
        try:
            st = os.stat(sock)
        except OSError:
            return None  # gone since parse(): open_disk says so
        return f"unix\0{st.st_dev}\0{st.st_ino}\0{export}"
    try:
        host, port = (parts.hostname or "").lower(), parts.port or NBD_PORT
    except ValueError:
        return None
    return f"tcp\0{host}\0{port}\0{export}"


def lock_target(url: str) -> TargetLock | None:
    """Take the host-local lock of the NBD target url; None when url is not an NBD target
    (local targets lock themselves). TargetRefused when another engine holds it, or when
    the lock cannot be taken at all (fail closed)."""
    key = identity(url)
    if key is None:
        return None
    shown = parse(url).display
    directory = lock_directory()
    path = os.path.join(directory, hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
    try:
        try:
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o1777)  # as /run/lock: every user's engines lock here
        except FileExistsError:
            pass
        # read-only is enough for flock, so a lock file another user created works too; no
        # symlink is followed, and a FIFO planted there does not block the open
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK |
                     os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise TargetRefused(f"cannot take the host lock of this NBD target in {directory}: "
                            f"{os.strerror(e.errno) if e.errno else e} (set TRANSFER_LOCK_DIR "
                            "to a writable directory)", disk=shown) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TargetRefused(f"the host lock {path} of this NBD target is not a regular file",
                                disk=shown)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise TargetRefused(f"cannot take the host lock {path} of this NBD target: "
                                    f"{os.strerror(e.errno)}", disk=shown) from None
            raise TargetRefused(f"another engine on this host is writing this target (its "
                                f"lock {path} is held)", disk=shown) from None
    except BaseException:
        os.close(fd)
        raise
    return TargetLock(fd, path)
