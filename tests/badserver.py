"""A small NBD server that misbehaves on purpose (RELIABILITY.md S7, S8), for tests only.

It speaks just enough of the protocol for libnbd 1.14: fixed newstyle
handshake, structured replies, the base:allocation meta context, reads and
block status, read-only. What it answers to block status, and which parts of
a read it sends back, is up to the test.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import Callable

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
STRUCTURED_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_INFO, REP_META_CONTEXT, REP_ERR_UNSUP = 1, 3, 4, (1 << 31) + 1
CMD_READ, CMD_DISC, CMD_BLOCK_STATUS = 0, 2, 7
REPLY_NONE, REPLY_OFFSET_DATA, REPLY_BLOCK_STATUS, FLAG_DONE = 0, 1, 5, 1
CONTEXT_ID = 1

# block_status(offset, length) -> list of (length, flags) pairs to send, or None for no chunk
Extents = Callable[[int, int], "list[tuple[int, int]] | None"]
# reads(offset, length) -> the (offset, length) runs of the request to send as OFFSET_DATA
# chunks, the last one flagged DONE (S11: a test may leave part of the request out)
Reads = Callable[[int, int], "list[tuple[int, int]]"]


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


class BadServer:
    def __init__(self, path: str, data: bytes, block_status: Extents,
                 reads: Reads | None = None) -> None:
        self.path = path
        self.data = data
        self.block_status = block_status
        self.reads = reads or (lambda off, n: [(off, n)])
        self.uri = f"nbd+unix:///?socket={path}"
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "BadServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        os.unlink(self.path)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            with conn:
                if self._handshake(conn):
                    self._transmission(conn)
        except (EOFError, OSError):
            pass

    def _opt_reply(self, conn, opt: int, kind: int, payload: bytes = b"") -> None:
        conn.sendall(struct.pack(">QII I", OPT_REPLY_MAGIC, opt, kind, len(payload)) + payload)

    def _handshake(self, conn: socket.socket) -> bool:
        conn.sendall(NBDMAGIC + struct.pack(">QH", IHAVEOPT, 1 | 2))  # FIXED_NEWSTYLE, NO_ZEROES
        _recv(conn, 4)  # client flags
        while True:
            magic, opt, length = struct.unpack(">QII", _recv(conn, 16))
            payload = _recv(conn, length)
            if opt == OPT_STRUCTURED_REPLY:
                self._opt_reply(conn, opt, REP_ACK)
            elif opt in (OPT_SET_META, OPT_LIST_META):
                name_len = struct.unpack(">I", payload[:4])[0]
                rest = payload[4 + name_len :]
                count = struct.unpack(">I", rest[:4])[0]
                pos = 4
                for _ in range(count):
                    n = struct.unpack(">I", rest[pos : pos + 4])[0]
                    query = rest[pos + 4 : pos + 4 + n]
                    pos += 4 + n
                    if query == b"base:allocation":
                        self._opt_reply(conn, opt, REP_META_CONTEXT,
                                        struct.pack(">I", CONTEXT_ID) + query)
                self._opt_reply(conn, opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                flags = 1 | 2  # HAS_FLAGS | READ_ONLY
                self._opt_reply(conn, opt, REP_INFO, struct.pack(">HQH", 0, len(self.data), flags))
                self._opt_reply(conn, opt, REP_ACK)
                if opt == OPT_GO:
                    return True
            elif opt == OPT_ABORT:
                self._opt_reply(conn, opt, REP_ACK)
                return False
            else:
                self._opt_reply(conn, opt, REP_ERR_UNSUP)

    def _chunk(self, conn, handle: int, kind: int, payload: bytes, done: bool = True) -> None:
        flags = FLAG_DONE if done else 0
        conn.sendall(struct.pack(">IHHQI", STRUCTURED_MAGIC, flags, kind, handle, len(payload))
                     + payload)

    def _transmission(self, conn: socket.socket) -> None:
        while True:
            magic, flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", _recv(conn, 28))
            if cmd == CMD_DISC:
                return
            if cmd == CMD_READ:
                runs = self.reads(offset, length)
                for i, (off, n) in enumerate(runs):
                    self._chunk(conn, handle, REPLY_OFFSET_DATA,
                                struct.pack(">Q", off) + self.data[off : off + n],
                                done=i == len(runs) - 1)
            elif cmd == CMD_BLOCK_STATUS:
                pairs = self.block_status(offset, length)
                if pairs is None:
                    self._chunk(conn, handle, REPLY_NONE, b"")
                else:
                    body = struct.pack(">I", CONTEXT_ID) + b"".join(
                        struct.pack(">II", n, f) for n, f in pairs)
                    self._chunk(conn, handle, REPLY_BLOCK_STATUS, body)
            else:
                raise EOFError  # not needed by these tests: hang up
