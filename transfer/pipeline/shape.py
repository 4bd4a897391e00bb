"""How many connections and requests a copy runs, and how big: validated, with defaults.

Defaults measured on the 2-core machines (DESIGN.md "What fast means here"), 4 GiB bench image
hot on nbdkit to null:, 5 runs each, CPU-s of client + server: 16 x 1 MiB reads in flight per
connection 0.60 + 0.82 (nbdcopy 0.60 + 0.86); 8 x 2 MiB 0.56 + 0.95 (nbdkit's buffers outgrow
the L2 cache: perf shows its pread copy costing more); 32 x 512 KiB 0.65 + 0.82; 64 x 256 KiB
0.83 + 1.09. Two connections, one reader thread each; one was slower, four no better. qemu-nbd
spends twice the server CPU on reads of 1 MiB or more and allows one connection: 64 x 256 KiB.
"""

from __future__ import annotations

from ..disks import Disk
from ..errors import BadInput
from ..integrity import BLOCK

DEFAULT_CONNECTIONS = 2
MULTI_CONN_REQUEST = (1 << 20, 16)
SINGLE_CONN_REQUEST = (256 << 10, 64)
MAX_REQUEST_SIZE = 32 << 20
MAX_BUFFER_BYTES = 256 << 20


def check_retries(retries: int) -> None:
    if retries < 0:
        raise BadInput(f"retries must be 0 or more, not {retries}")


def shape(src: Disk, connections: int | None, in_flight: int | None,
           request_size: int | None) -> tuple[int, int, int]:
    multi = src.max_connections > 1
    size_default, flight_default = MULTI_CONN_REQUEST if multi else SINGLE_CONN_REQUEST
    conns_default = DEFAULT_CONNECTIONS
    if src.shape is not None:  # the disk knows better (a request per round trip: https://)
        conns_default, flight_default, size_default = src.shape
    connections = conns_default if connections is None else connections
    request_size = size_default if request_size is None else request_size
    in_flight = flight_default if in_flight is None else in_flight
    if connections < 1:
        raise BadInput(f"connections must be at least 1, not {connections}")
    if in_flight < 1:
        raise BadInput(f"requests in flight must be at least 1, not {in_flight}")
    if request_size < BLOCK or request_size % BLOCK or request_size > MAX_REQUEST_SIZE:
        raise BadInput(f"request size must be a multiple of {BLOCK} up to {MAX_REQUEST_SIZE}, "
                       f"not {request_size}")
    if connections * in_flight * request_size > MAX_BUFFER_BYTES:
        raise BadInput(f"{connections} connections x {in_flight} requests x {request_size} bytes "
                       f"exceeds the {MAX_BUFFER_BYTES >> 20} MiB buffer bound")
    return connections, in_flight, request_size
