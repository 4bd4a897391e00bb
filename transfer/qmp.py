"""A small QMP client (QEMU Machine Protocol) over a unix socket, for qemu-storage-daemon.

QMP is JSON objects, one per line: a greeting, then `qmp_capabilities`, then
commands ({"execute", "arguments"}) each answered by {"return"} or {"error":
{"class", "desc"}}; asynchronous {"event"} objects may arrive in between and
are kept in `events`. The daemon is untrusted input like any server: every
reply is parsed and checked, a reply line is capped, and every wait has a
deadline.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from .errors import SourceError

MAX_LINE = 16 << 20  # query-named-block-nodes of a big graph is far smaller
TIMEOUT = 30.0


class QmpError(SourceError):
    """QMP said no (or said nothing): .qmp_class is QEMU's error class, when there is one."""

    def __init__(self, message: str, *, qmp_class: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.qmp_class = qmp_class


class Qmp:
    def __init__(self, path: str, *, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError("the socket does not speak QMP (no greeting)", disk=path)
            self.version = greeting["QMP"].get("version", {}).get("qemu", {})
            self.execute("qmp_capabilities")
        except OSError as e:
            self.close()
            raise QmpError(f"cannot talk to QMP: {e.strerror or e}", disk=path,
                           errno=e.errno) from None
        except BaseException:
            self.close()
            raise

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run command; its "return" value, or QmpError with QEMU's class and description."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                reply = self._read()
                if "event" in reply:
                    self.events.append(reply)
                    continue
                break
        except OSError as e:
            raise QmpError(f"{command}: {e.strerror or e}", disk=self.path, errno=e.errno) from None
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise QmpError(f"{command}: {err.get('desc', 'failed')}", disk=self.path,
                           qmp_class=err.get("class"))
        if "return" not in reply:
            raise QmpError(f"{command}: a reply without return or error", disk=self.path)
        return reply["return"]

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise QmpError(f"a QMP line longer than {MAX_LINE} bytes", disk=self.path)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"no QMP reply within {self.timeout:g} s", disk=self.path)
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise QmpError(f"no QMP reply within {self.timeout:g} s", disk=self.path) from None
            if not chunk:
                raise QmpError("QMP connection closed", disk=self.path)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            obj = json.loads(line)
        except ValueError:
            raise QmpError("QMP sent a line that is not JSON", disk=self.path) from None
        if not isinstance(obj, dict):
            raise QmpError("QMP sent JSON that is not an object", disk=self.path)
        return obj

    # The block-layer calls a migration makes.

    def node(self, name: str) -> dict[str, Any]:
        """The named block node (query-named-block-nodes), or QmpError when there is none."""
        for n in self.execute("query-named-block-nodes", flat=True):
            if isinstance(n, dict) and n.get("node-name") == name:
                return n
        raise QmpError(f"no block node named {name!r}", disk=self.path)

    def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        """The node's dirty bitmaps by name: recording, persistent, busy, inconsistent..."""
        out = {}
        for b in self.node(node).get("dirty-bitmaps", []) or []:
            if isinstance(b, dict) and isinstance(b.get("name"), str):
                out[b["name"]] = b
        return out

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Qmp", "QmpError"]
