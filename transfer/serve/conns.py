"""`transfer serve`'s connections: a cap on clients, and a stop that does not wait on them.

A connection is a thread (http.server's ThreadingHTTPServer). One past max_clients is answered
503 and closed at once. At a stop (SIGTERM, SIGINT) the listening socket closes first; then the
idle connections (a keep-alive client between requests) are closed at once, the answers in
flight may finish for STOP_GRACE seconds, and what is left is cut: server_close() never waits
CLIENT_TIMEOUT for a client that keeps its connection open or stopped reading.
"""

from __future__ import annotations

import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIENT_TIMEOUT = 60.0  # seconds a connection may stay idle, or stall mid-request
STOP_GRACE = 10.0  # seconds a stop waits for the answers in flight before it cuts them


def log(message: str) -> None:
    print(f"transfer serve: {message}", file=sys.stderr, flush=True)


class CappedServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the handler threads (after drain())
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], handler: type, max_clients: int) -> None:
        self.max_clients = max_clients
        self.slots = threading.BoundedSemaphore(max_clients)
        self.conns: dict[Any, TrackedHandler] = {}  # the connections open
        self.conns_lock = threading.Condition()
        self.stopping = False
        super().__init__(addr, handler)

    def drain(self, grace: float = STOP_GRACE) -> None:
        """At a stop, after shutdown() (no new connection): close the idle connections now,
        let the answers in flight finish for grace seconds, then cut theirs too."""
        with self.conns_lock:
            self.stopping = True
            for h in self.conns.values():
                if not h.busy:
                    h.cut()
            if not self.conns_lock.wait_for(
                    lambda: not any(h.busy for h in self.conns.values()), grace):
                log(f"{sum(h.busy for h in self.conns.values())} answer(s) still in flight "
                    f"after {grace:g} s: cut")
            for h in self.conns.values():
                h.cut()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            log(f"{client_address[0]}: refused, {self.max_clients} clients already")
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log(f"{client_address[0]}: {sys.exc_info()[1]!r}")  # never a traceback


class TrackedHandler(BaseHTTPRequestHandler):
    """A connection the server can end from another thread, knowing whether it is inside a
    request (busy: from the request's first line to its answer's end)."""

    timeout = CLIENT_TIMEOUT
    busy = False
    server: CappedServer

    def setup(self) -> None:
        super().setup()
        with self.server.conns_lock:
            self.server.conns[self.request] = self

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.forget()

    def forget(self) -> None:
        """The connection is over (finish(), or a setup() that failed: no finish() then)."""
        with self.server.conns_lock:
            self.server.conns = {k: v for k, v in self.server.conns.items() if v is not self}
            self.server.conns_lock.notify_all()

    def cut(self) -> None:
        """End this connection from another thread: its reads and writes fail at once (the
        plain socket's shutdown: SSLSocket's own would drop its TLS state under the handler)."""
        try:
            socket.socket.shutdown(self.connection, socket.SHUT_RDWR)
        except OSError:
            pass

    def handle_one_request(self) -> None:
        """One request; a stop that comes while it is answered lets it finish (drain), one
        that comes between requests ends the connection."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except OSError:  # idle past CLIENT_TIMEOUT (TimeoutError), or cut by a stop
            self.close_connection = True
            return
        with self.server.conns_lock:
            if not self.raw_requestline or self.server.stopping:
                self.close_connection = True
                return
            self.busy = True
        try:
            self.answer()
        finally:
            with self.server.conns_lock:
                self.busy = False
                self.server.conns_lock.notify_all()
            if self.server.stopping:
                self.close_connection = True

    def answer(self) -> None:
        """http.server's handle_one_request after its readline."""
        try:
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.parse_request():  # it answered the error
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(HTTPStatus.NOT_IMPLEMENTED,
                                f"unsupported method {self.command[:20]!r}")
                return
            method()
            self.wfile.flush()
        except TimeoutError as e:
            self.log_error("request timed out: %r", e)
            self.close_connection = True
