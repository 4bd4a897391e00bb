"""The Python API: copy() and copy_async() take addresses and options, return a Report.

Library code never prints, exits or configures logging: failures are
TransferError subclasses carrying their exit code, and progress goes to the
caller's callback.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from . import _native
from .disks import Disk, open_disk
from .errors import BadInput, TargetRefused
from .integrity import BLOCK, Manifest
from .pipeline import copy as engine
from .pipeline.copy import Progress

# Defaults measured on the 2-core machines (DESIGN.md "What fast means here"), 4 GiB bench image
# hot on nbdkit to null:, 5 runs each, CPU-s of client + server: 16 x 1 MiB reads in flight per
# connection 0.60 + 0.82 (nbdcopy 0.60 + 0.86); 8 x 2 MiB 0.56 + 0.95 (nbdkit's buffers outgrow
# the L2 cache: perf shows its pread copy costing more); 32 x 512 KiB 0.65 + 0.82; 64 x 256 KiB
# 0.83 + 1.09. Two connections, one reader thread each; one was slower, four no better. qemu-nbd
# spends twice the server CPU on reads of 1 MiB or more and allows one connection: 64 x 256 KiB.
DEFAULT_CONNECTIONS = 2
MULTI_CONN_REQUEST = (1 << 20, 16)
SINGLE_CONN_REQUEST = (256 << 10, 64)
MAX_REQUEST_SIZE = 32 << 20
MAX_BUFFER_BYTES = 256 << 20


@dataclass
class Report:
    source: str
    target: str
    size: int
    target_size: int
    bytes_copied: int
    bytes_zeroed: int
    bytes_skipped: int
    bytes_read: int
    seconds: float
    digest: str
    connections: int
    requests: int
    zero_requests: int
    request_size: int
    in_flight: int
    zero_method: str
    target_created: bool
    flushed: bool
    native: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check_target(src: Disk, dst: Disk, *, force: bool) -> None:
    """Target safety, before the first write (RELIABILITY.md T3, T5-T7)."""
    if dst.size is not None and dst.size < src.size:
        raise TargetRefused(f"the target is smaller than the source ({dst.size} < {src.size} bytes)",
                            disk=dst.display)
    if src.identities() & dst.identities():
        raise TargetRefused(f"the target is the source ({src.display}) or the storage under it",
                            disk=dst.display)
    if not force:
        sig = dst.signature()
        if sig:
            raise TargetRefused(f"the target holds a {sig} signature; pass --force to overwrite it",
                                disk=dst.display)


def _shape(src: Disk, connections: int | None, in_flight: int | None,
           request_size: int | None) -> tuple[int, int, int]:
    multi = src.max_connections > 1
    size_default, flight_default = MULTI_CONN_REQUEST if multi else SINGLE_CONN_REQUEST
    connections = DEFAULT_CONNECTIONS if connections is None else connections
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


async def copy_async(source: str, target: str, *, connections: int | None = None,
                     in_flight: int | None = None, request_size: int | None = None,
                     target_is_zero: bool = False, force: bool = False,
                     on_progress: Callable[[Progress], None] | None = None,
                     native: str | None = None) -> Report:
    """Copy the whole disk at source onto target and return what was done.

    source: an NBD URI or a local file or block device. target: the same, a
    missing file (created at the source's size) or "null:". The target is
    durable (flushed) when this returns.
    """
    kernels = _native.kernels(native)
    src = await asyncio.to_thread(open_disk, source, "source")
    dst: Disk | None = None
    manifest: Manifest | None = None
    try:
        dst = await asyncio.to_thread(open_disk, target, "target")
        _check_target(src, dst, force=force)
        conns, flight, req_size = _shape(src, connections, in_flight, request_size)
        if dst.size is None:
            dst.create(src.size)
        manifest = Manifest(src.size)
        result = await engine.run(src, dst, manifest, kernels, connections=conns,
                                  in_flight=flight, request_size=req_size,
                                  target_zero=dst.reads_zero or target_is_zero,
                                  on_progress=on_progress)
        st = result.stats
        return Report(
            source=src.display, target=dst.display, size=src.size, target_size=dst.size,
            bytes_copied=st.bytes_copied, bytes_zeroed=st.bytes_zeroed,
            bytes_skipped=st.bytes_skipped, bytes_read=st.bytes_read,
            seconds=round(result.seconds, 6), digest=manifest.digest_string(),
            connections=result.connections, requests=st.requests,
            zero_requests=st.zero_requests, request_size=result.request_size,
            in_flight=result.in_flight, zero_method=dst.zero_method,
            target_created=dst.created, flushed=True, native=kernels.describe(),
        )
    finally:
        if manifest is not None:
            manifest.close()
        if dst is not None:
            dst.close()
        src.close()


def copy(source: str, target: str, **options: Any) -> Report:
    """Blocking form of copy_async() for callers without an event loop."""
    return asyncio.run(copy_async(source, target, **options))
