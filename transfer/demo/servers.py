"""Run real NBD servers (nbdkit, qemu-nbd) on a unix socket, for the demo, tests and benchmarks.

Each server runs in the foreground as our child, so it is stopped by its own
pid and nothing else; `with` stops it even when the body fails. Readiness is
the socket accepting a connection.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Sequence

START_TIMEOUT = 20.0


class ServerError(RuntimeError):
    pass


def _listening(path: str) -> bool:
    """Does a server accept connections on the unix socket at path (a probe connect)?"""
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class Server:
    """A server process listening on `sock`; `uri` is its NBD address."""

    program = ""

    def __init__(self, argv: Sequence[str], sock: str, export: str = "") -> None:
        self.argv = list(argv)
        self.sock = sock
        self.uri = f"nbd+unix:///{export}?socket={sock}"
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def available(cls) -> bool:
        return shutil.which(cls.program) is not None

    def start(self) -> "Server":
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        # stderr goes to a file, not a pipe: nobody reads a pipe while the server runs, and a
        # server logging an error per aborted request (nbdkit, when a client is killed) would
        # block on a full pipe and stop accepting connections.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise ServerError(f"{self.argv[0]} exited with {self.proc.returncode}: {err.strip()}")
            if self._ready():
                return self
            time.sleep(0.02)
        self.stop()
        raise ServerError(f"{self.argv[0]} did not listen on {self.sock} within {START_TIMEOUT:g} s")

    def _ready(self) -> bool:
        return _listening(self.sock)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Nbdkit(Server):
    """nbdkit [filters] PLUGIN [args...] on a unix socket, e.g. Nbdkit(sock, "memory", "64M")."""

    program = "nbdkit"

    def __init__(self, sock: str, plugin: str, *args: str, readonly: bool = False,
                 filters: Sequence[str] = (), options: Sequence[str] = ()) -> None:
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, *options]
        if readonly:
            argv.append("-r")
        for f in filters:
            argv.append(f"--filter={f}")
        argv += [plugin, *args]
        super().__init__(argv, sock)


class QemuNbd(Server):
    """qemu-nbd serving an image file (qcow2 or raw) on a unix socket."""

    program = "qemu-nbd"

    def __init__(self, sock: str, image: str, *, fmt: str | None = "qcow2",
                 readonly: bool = True, options: Sequence[str] = ()) -> None:
        # --persistent: without it qemu-nbd exits when its first client (our readiness probe)
        # disconnects. fmt None: image is not a file (e.g. "--image-opts" with options).
        argv = ["qemu-nbd", "--persistent", "-k", sock, *(["-f", fmt] if fmt else []), *options]
        if readonly:
            argv.append("-r")
        argv.append(image)
        super().__init__(argv, sock)


class QemuStorageDaemon(Server):
    """qemu-storage-daemon holding one image as block node `node`, with a QMP monitor on
    `qmp` and an NBD server on `sock` that exports the node writable as `rw` (the "VM"
    writes through it). A migration adds its own read-only exports over QMP."""

    program = "qemu-storage-daemon"

    def __init__(self, sock: str, image: str, *, qmp: str, fmt: str = "qcow2",
                 node: str = "disk0", nbd: bool = True,
                 more: Sequence[tuple[str, str]] = ()) -> None:
        """more: further (image, node) pairs, the VM's other disks, each exported writable
        as rw-NODE (uri_of(node))."""
        self.qmp = qmp
        self.node = node
        self.nbd = nbd  # False: no NBD server (a migration starts its own over QMP)
        argv = ["qemu-storage-daemon"]
        for img, name in [(image, node), *more]:
            argv += ["--blockdev", f"driver=file,filename={img},node-name={name}-file",
                     "--blockdev", f"driver={fmt},file={name}-file,node-name={name}"]
        if nbd:
            argv += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                     "--export", f"type=nbd,id=rw,node-name={node},writable=on,name=rw"]
            for _, name in more:
                argv += ["--export",
                         f"type=nbd,id=rw-{name},node-name={name},writable=on,name=rw-{name}"]
        argv += ["--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0",
                 "--monitor", "chardev=qmp0"]
        super().__init__(argv, sock, export="rw")

    def uri_of(self, node: str) -> str:
        """The writable export of node (the first node's is `uri`)."""
        export = "rw" if node == self.node else f"rw-{node}"
        return f"nbd+unix:///{export}?socket={self.sock}"

    def start(self) -> "Server":
        if os.path.exists(self.qmp):
            os.unlink(self.qmp)
        return super().start()

    def _ready(self) -> bool:
        return _listening(self.qmp) and (not self.nbd or _listening(self.sock))
