"""serve(): open the exports, listen, hand the tickets over, serve until a signal."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from .. import _native
from ..errors import BadInput
from . import DEFAULT_TTL, MAX_CLIENTS
from .exports import Exports, write_ticket_file
from ..url import is_loopback
from .conns import log
from .http import Server, tls_context


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise BadInput(f"--listen must be HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(sources: list[str], listen: str, *, cert: str | None = None, key: str | None = None,
          client_ca: str | None = None, ticket_file: str | None = None,
          ticket_ttl: float = DEFAULT_TTL, insecure: bool = False,
          max_clients: int = MAX_CLIENTS, ready: Any = None, dirty_bitmap: str | None = None,
          **options: Any) -> int:
    """Serve until a signal; 0. ready(urls), when given, is called once listening."""
    host, port = parse_listen(listen)
    if (cert is None) != (key is None):
        raise BadInput("--tls-cert and --tls-key go together")
    if client_ca and cert is None:
        raise BadInput("--client-ca needs --tls-cert and --tls-key")
    if cert is None and not insecure and not is_loopback(host):
        raise BadInput(f"plain HTTP on {host}, which is not a loopback address: give "
                       "--tls-cert and --tls-key, or --insecure")
    if ticket_ttl <= 0 or max_clients < 1:
        raise BadInput("--ticket-ttl and --max-clients must be positive")
    try:
        tls = tls_context(cert, key, client_ca) if cert and key else None
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load the TLS certificate or key: {e}") from None
    exports = Exports(ticket_ttl)
    try:
        for s in sources:
            exports.add(s, dirty_bitmap, **options)
        resumed = bool(ticket_file) and exports.resume(ticket_file)
        try:
            server = Server((host, port), exports, tls, max_clients, _native.kernels())
        except OSError as e:
            raise BadInput(f"cannot listen on {host}:{port}: {e.strerror}") from None
        scheme = "https" if tls else "http"
        bound = server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        lines = [f"{scheme}://{shown}:{bound}/images/{e.ticket} {e.display}"
                 for e in exports.by_ticket.values()]
        if ticket_file and not resumed:  # (resumed: the file stays, its time the tickets')
            write_ticket_file(ticket_file, lines)
        print("\n".join(lines), flush=True)
        _run(server, ready, lines)
    finally:
        exports.close()
    return 0


def _run(server: Server, ready: Any, lines: list[str]) -> None:
    def stop(signum: int, frame: Any) -> None:
        log(f"{signal.Signals(signum).name}: finishing the responses in flight")
        threading.Thread(target=server.shutdown, daemon=True).start()

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        if ready is not None:
            ready([line.split(" ", 1)[0] for line in lines])
        log(f"serving {len(lines)} export(s)")
        server.serve_forever(poll_interval=0.2)
    finally:
        server.drain()  # idle connections closed, the answers in flight finished or dropped
        server.server_close()  # waits for the handler threads
        for s, h in old.items():
            signal.signal(s, h)
        sys.stderr.flush()
