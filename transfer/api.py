"""The Python API: copy() and copy_async() take addresses and options, return a Report.

Library code never prints, exits or configures logging: failures are
TransferError subclasses carrying their exit code, and progress goes to the
caller's callback.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from functools import partial
from typing import Any, Callable

from . import _native
from .disks import Disk, open_disk
from .disks.lock import lock_target
from .errors import BadInput, TargetRefused, TransferError, VerifyFailed
from .integrity import BLOCK, Manifest
from .pipeline import copy as engine
from .pipeline.copy import Progress
from .reports import ChecksumReport, Report, VerifyReport
from .tls import Tls

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
VERIFY_OFFSETS = 1000  # differing offsets kept for a report (the count is always exact)


def _check_retries(retries: int) -> None:
    if retries < 0:
        raise BadInput(f"retries must be 0 or more, not {retries}")


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


def _check_space(src: Disk, dst: Disk) -> None:
    """T1 pre-flight for a file target: refuse (nothing written) when its file system lacks
    room for the source's data. Where the free space covers the whole disk, nothing is asked;
    else the source's data is counted (NBD: base:allocation on the spare handle; a file: its
    allocated blocks), an upper bound of what the copy writes (zero blocks are not written)."""
    if dst.kind != "file":
        return
    path = getattr(dst, "path")
    try:
        fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
        held = os.stat(path).st_blocks * 512 if dst.size is not None else 0
    except OSError:
        return  # the open that follows reports what is wrong
    room = fs.f_bavail * fs.f_frsize + held
    if room >= src.size:
        return
    need = src.data_bytes()
    if need > room:
        raise TargetRefused(f"its file system has {room} bytes free for it, and the source holds "
                            f"up to {need} bytes of data (--force writes anyway)",
                            disk=dst.display)


def _incomplete(dst: Disk, e: TransferError) -> None:
    """A failed copy never leaves a target that looks done (T1): a file this run created is
    removed (there is nothing to resume: `sync` is the resumable form, with its journal), and
    any other target is named incomplete in the error."""
    if dst.kind == "null" or "incomplete" in e.message:
        return
    if dst.kind == "file" and dst.created:
        try:
            os.unlink(getattr(dst, "path"))
            e.message += "; the incomplete target file was removed"
            return
        except OSError:
            pass
    e.message += f"; the target {dst.display} is incomplete"


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


async def _scan(disk: Disk, manifest: Manifest, kernels: _native.Kernels, *, size: int,
                connections: int | None, in_flight: int | None, request_size: int | None,
                on_progress: Callable[[Progress], None] | None,
                known_zero: Manifest | None = None,
                retries: int = engine.RETRIES,
                ranges: list[tuple[int, int]] | None = None) -> engine.Result:
    """Read and hash the first size bytes of disk into manifest (the copy engine, to null:);
    with ranges, only those (sorted, block-aligned) ranges."""
    conns, flight, req_size = _shape(disk, connections, in_flight, request_size)
    sink = open_disk("null:", "target")
    sink.create(size)
    return await engine.run(disk, sink, manifest, kernels, connections=conns, in_flight=flight,
                            request_size=req_size, target_zero=True, on_progress=on_progress,
                            size=size, known_zero=known_zero, retries=retries, ranges=ranges)


async def _read_back(target: str, manifest: Manifest, kernels: _native.Kernels, *,
                     on_progress: Callable[[Progress], None] | None,
                     limit: int = VERIFY_OFFSETS,
                     tls: Tls | None = None,
                     ranges: list[tuple[int, int]] | None = None) -> tuple[int, list[int], int]:
    """Read target back (O_DIRECT where local) and compare with manifest: (count, offsets, bytes).

    Blocks the copy wrote as data are read back; blocks it zeroed or skipped (zero
    digest) are not read again, so the read-back costs at most one read of the
    allocated data, block devices included. `transfer verify` reads everything.
    ranges: read back only these (sorted, block-aligned) ranges; the rest is not compared.
    """
    if ranges is not None and not ranges:
        return 0, [], 0
    disk = await asyncio.to_thread(open_disk, target, "source", direct=True, kernels=kernels,
                                   tls=tls)
    back = Manifest(manifest.size)
    try:
        if ranges is not None:  # blocks outside ranges are not read: they compare equal
            back.view[:] = manifest.view
        result = await _scan(disk, back, kernels, size=manifest.size, connections=None,
                             in_flight=None, request_size=None, on_progress=on_progress,
                             known_zero=manifest, ranges=ranges)
        count, offsets = manifest.differences(back, limit)
        return count, offsets, result.stats.bytes_read
    finally:
        back.close()
        disk.close()


async def copy_async(source: str, target: str, *, connections: int | None = None,
                     in_flight: int | None = None, request_size: int | None = None,
                     target_is_zero: bool = False, force: bool = False, verify: bool = False,
                     manifest: str | None = None, timeout: float | None = None,
                     retries: int = engine.RETRIES,
                     on_progress: Callable[[Progress], None] | None = None,
                     native: str | None = None, tls: Tls | None = None) -> Report:
    """Copy the whole disk at source onto target and return what was done.

    source: an NBD URI or a local file or block device. target: the same, a
    missing file (created at the source's size) or "null:". The target is
    durable (flushed) when this returns. verify: read the target back (O_DIRECT
    where local) and compare every block with the digests taken while copying;
    a difference raises VerifyFailed. manifest: also write the per-block digests
    to this file. timeout: seconds an NBD server may stay silent (handshake, or
    reads in flight) before the copy fails (default 30 s to connect, 120 s
    for replies). retries: how often one failed read (or a dropped connection)
    is tried again, with backoff, before the copy fails. tls: credentials for
    nbds:// disks, Tls(ca=...) or Tls(psk_file=...) (default: the operator's
    $TRANSFER_TLS_CA or $TRANSFER_TLS_PSK_FILE); an nbds:// disk without one
    is refused, since libnbd would not verify the server (transfer.tls).
    """
    if timeout is not None and timeout <= 0:
        raise BadInput(f"timeout must be positive, not {timeout}")
    _check_retries(retries)
    kernels = _native.kernels(native)
    opening = partial(open_disk, timeout=timeout, kernels=kernels, tls=tls)
    src = await asyncio.to_thread(opening, source, "source")
    dst: Disk | None = None
    digests: Manifest | None = None
    target_lock = None
    try:
        target_lock = lock_target(target)  # an NBD target: one engine per host (P4)
        dst = await asyncio.to_thread(opening, target, "target")
        if verify and dst.kind == "null":
            raise BadInput("null: keeps nothing to verify", disk=dst.display, kind="target")
        _check_target(src, dst, force=force)
        conns, flight, req_size = _shape(src, connections, in_flight, request_size)
        if not force:
            await asyncio.to_thread(_check_space, src, dst)
        if dst.size is None:
            dst.create(src.size)
        digests = Manifest.create(manifest, src.size) if manifest else Manifest(src.size)
        try:
            result = await engine.run(src, dst, digests, kernels, connections=conns,
                                      in_flight=flight, request_size=req_size,
                                      target_zero=dst.reads_zero or target_is_zero,
                                      on_progress=on_progress, retries=retries)
        except TransferError as e:
            _incomplete(dst, e)
            raise
        st = result.stats
        report = Report(
            source=src.display, target=dst.display, size=src.size, target_size=dst.size,
            bytes_copied=st.bytes_copied, bytes_zeroed=st.bytes_zeroed,
            bytes_skipped=st.bytes_skipped, bytes_read=st.bytes_read,
            seconds=round(result.seconds, 6), digest=digests.digest_string(),
            connections=result.connections, requests=st.requests,
            zero_requests=st.zero_requests, request_size=result.request_size,
            in_flight=result.in_flight, zero_method=dst.zero_method,
            target_created=dst.created, flushed=True, native=kernels.describe(),
            retries=st.retries, reconnects=st.reconnects,
        )
        if manifest:
            digests.save()
            report.manifest = manifest
        if verify:
            if dst.kind == "nbd":  # a single-connection server would make a second one wait
                dst.close()  # (a local target stays open: O_EXCL keeps holding the device)
            started = time.monotonic()
            count, offsets, read = await _read_back(target, digests, kernels,
                                                    on_progress=on_progress, tls=tls)
            report.verify_seconds = round(time.monotonic() - started, 6)
            report.verify_bytes_read = read
            if count:
                raise VerifyFailed(f"{count} blocks of {BLOCK} bytes read back differ from what "
                                   f"was copied; the first", disk=dst.display, offset=offsets[0])
            report.verified = True
        return report
    finally:
        if digests is not None:
            digests.close()
        if dst is not None:
            dst.close()
        if target_lock is not None:
            target_lock.close()
        src.close()


def copy(source: str, target: str, **options: Any) -> Report:
    """Blocking form of copy_async() for callers without an event loop."""
    return asyncio.run(copy_async(source, target, **options))


async def checksum_async(disk: str, *, connections: int | None = None,
                         in_flight: int | None = None, request_size: int | None = None,
                         manifest: str | None = None, retries: int = engine.RETRIES,
                         on_progress: Callable[[Progress], None] | None = None,
                         native: str | None = None, tls: Tls | None = None) -> ChecksumReport:
    """The disk digest of disk (holes and zero extents hashed without reading).

    Local disks are read with O_DIRECT: the digest is of what the device holds,
    not of what the page cache holds. manifest: also write the per-block
    digests to this file. retries, tls: as for copy().
    """
    _check_retries(retries)
    kernels = _native.kernels(native)
    d = await asyncio.to_thread(open_disk, disk, "source", direct=True, kernels=kernels, tls=tls)
    digests: Manifest | None = None
    try:
        digests = Manifest.create(manifest, d.size) if manifest else Manifest(d.size)
        result = await _scan(d, digests, kernels, size=d.size, connections=connections,
                             in_flight=in_flight, request_size=request_size,
                             on_progress=on_progress, retries=retries)
        if manifest:
            digests.save()
        return ChecksumReport(disk=d.display, size=d.size, digest=digests.digest_string(),
                              seconds=round(result.seconds, 6),
                              bytes_read=result.stats.bytes_read,
                              connections=result.connections, native=kernels.describe(),
                              manifest=manifest)
    finally:
        if digests is not None:
            digests.close()
        d.close()


def checksum(disk: str, **options: Any) -> ChecksumReport:
    return asyncio.run(checksum_async(disk, **options))


_DIGEST = re.compile(r"^xxh3-128:64k:[0-9a-f]{32}$")


async def verify_async(source: str | None, target: str, *, expect: str | None = None,
                       retries: int = engine.RETRIES,
                       on_progress: Callable[[Progress], None] | None = None,
                       native: str | None = None, tls: Tls | None = None) -> VerifyReport:
    """Compare target with source block by block (both read at once), or with a digest.

    The conversion migration type: someone else populated target. Local disks
    are read with O_DIRECT. A target larger than the source is compared over
    the source's size (a PVC is often larger); a smaller one differs. Never
    retried: a difference is reported, and verify() callers get equal=False (a failed
    read is, up to retries times, as for copy()). tls: as for copy().
    """
    _check_retries(retries)
    if (source is None) == (expect is None):
        raise BadInput("verify needs a source disk or an expected digest (not both)")
    if expect is not None and not _DIGEST.match(expect):
        raise BadInput(f"--expect {expect!r} is not a digest of the form xxh3-128:64k:<32 hex>")
    kernels = _native.kernels(native)
    started = time.monotonic()
    disks: list[Disk] = []
    manifests: list[Manifest] = []
    try:
        for url in ([source] if source is not None else []) + [target]:
            disks.append(await asyncio.to_thread(open_disk, url, "source", direct=True,
                                                 kernels=kernels, tls=tls))
        tgt = disks[-1]
        size = disks[0].size
        if tgt.size < size:
            raise VerifyFailed(f"the target is smaller than the source ({tgt.size} < {size} "
                               "bytes)", disk=tgt.display)
        manifests = [Manifest(size) for _ in disks]
        results = await asyncio.gather(*(
            _scan(d, m, kernels, size=size, connections=None, in_flight=None, request_size=None,
                  on_progress=on_progress if d is tgt else None, retries=retries)
            for d, m in zip(disks, manifests)))
        target_digest = manifests[-1].digest_string()
        if source is not None:
            count, offsets = manifests[0].differences(manifests[-1], VERIFY_OFFSETS)
            source_digest = manifests[0].digest_string()
        else:
            source_digest = expect
            count, offsets = (0, []) if target_digest == expect else (None, [])
        return VerifyReport(
            equal=count == 0, source=disks[0].display if source is not None else None,
            target=tgt.display, size=size, target_size=tgt.size, blocks=manifests[-1].blocks,
            differing_blocks=count, first_differences=offsets, source_digest=source_digest,
            target_digest=target_digest, seconds=round(time.monotonic() - started, 6),
            bytes_read=sum(r.stats.bytes_read for r in results))
    finally:
        for m in manifests:
            m.close()
        for d in disks:
            d.close()


def verify(source: str | None, target: str, **options: Any) -> VerifyReport:
    return asyncio.run(verify_async(source, target, **options))
