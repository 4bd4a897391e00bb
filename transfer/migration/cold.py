"""A cold copy: the whole disk once, flushed, optionally read back and compared (copy()).

Library code never prints, exits or configures logging: failures are TransferError subclasses
carrying their exit code, and progress goes to the caller's callback.
"""

from __future__ import annotations

import asyncio
import os
import time
from functools import partial
from typing import Any, Callable

from .. import _native
from ..disks import Disk, open_disk
from ..disks.lock import lock_target
from ..errors import BadInput, TargetRefused, TransferError, VerifyFailed
from ..integrity import BLOCK, Manifest
from ..pipeline import engine
from ..pipeline.retry import RETRIES
from ..observe.events import Progress
from ..pipeline.shape import check_retries, shape
from ..reports import Report
from ..tls import Tls
from .verify import read_back


def check_target(src: Disk, dst: Disk, *, force: bool) -> None:
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


def check_space(src: Disk, dst: Disk) -> None:
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


def incomplete(dst: Disk, e: TransferError) -> None:
    """A failed copy never leaves a target that looks done (T1): a file this run created is
    removed (there is nothing to resume: `sync` is the resumable form, with its journal), and
    any other target is named incomplete in the error."""
    if dst.kind == "null" or "incomplete" in e.message:
        return
    if dst.kind in ("file", "stream") and dst.created:
        try:
            os.unlink(getattr(dst, "path"))
            e.message += "; the incomplete target file was removed"
            return
        except OSError:
            pass
    e.message += f"; the target {dst.display} is incomplete"


async def copy_async(source: str, target: str, *, connections: int | None = None,
                     in_flight: int | None = None, request_size: int | None = None,
                     target_is_zero: bool = False, force: bool = False, verify: bool = False,
                     manifest: str | None = None, timeout: float | None = None,
                     retries: int = RETRIES, on_progress: Callable[[Progress], None] | None = None,
                     native: str | None = None, tls: Tls | None = None,
                     compress: str = "auto") -> Report:
    """Copy the whole disk at source onto target and return what was done.

    source: an address (transfer.url). target: the same, a missing file (created
    at the source's size), "stream:FILE" or "null:"; durable (flushed) when this
    returns. verify: read the target back (O_DIRECT where local) and compare every
    block with the digests taken while copying; a difference raises VerifyFailed.
    manifest: also write the per-block digests to this file. timeout: seconds a
    server may stay silent before the copy fails (NBD: 30 s to connect, 120 s for
    replies). retries: how often one failed read (or a dropped connection)
    is tried again, with backoff, before the copy fails. tls: credentials for
    nbds:// disks, Tls(ca=...) or Tls(psk_file=...) (default: the operator's
    $TRANSFER_TLS_CA or $TRANSFER_TLS_PSK_FILE); an nbds:// disk without one
    is refused, since libnbd would not verify the server (transfer.tls); https://
    sources take a CA the same way. compress: auto, none or zstd[:LEVEL] (frames).
    """
    if timeout is not None and timeout <= 0:
        raise BadInput(f"timeout must be positive, not {timeout}")
    check_retries(retries)
    kernels = _native.kernels(native)
    opening = partial(open_disk, timeout=timeout, kernels=kernels, tls=tls, compress=compress)
    src = await asyncio.to_thread(opening, source, "source")
    dst: Disk | None = None
    digests: Manifest | None = None
    target_lock = None
    try:
        target_lock = lock_target(target)  # an NBD target: one engine per host (P4)
        dst = await asyncio.to_thread(opening, target, "target")
        conns, flight, req_size = shape(src, connections, in_flight, request_size)
        await _ready(src, dst, verify=verify, force=force)
        digests = Manifest.create(manifest, src.size) if manifest else Manifest(src.size)
        try:
            result = await engine.run(src, dst, digests, kernels, connections=conns,
                                      in_flight=flight, request_size=req_size,
                                      target_zero=dst.reads_zero or target_is_zero,
                                      on_progress=on_progress, retries=retries)
        except TransferError as e:
            incomplete(dst, e)
            raise
        report = _report(src, dst, result, digests, kernels)
        if manifest:
            digests.save()
            report.manifest = manifest
        if verify:
            await _verify(target, dst, digests, kernels, report, on_progress, tls)
        return report
    finally:
        if digests is not None:
            digests.close()
        if dst is not None:
            dst.close()
        if target_lock is not None:
            target_lock.close()
        src.close()


async def _ready(src: Disk, dst: Disk, *, verify: bool, force: bool) -> None:
    """Refuse a target the copy must not write (T1-T7), then create a missing file."""
    if verify and dst.kind == "null":
        raise BadInput("null: keeps nothing to verify", disk=dst.display, kind="target")
    check_target(src, dst, force=force)
    if not force:
        await asyncio.to_thread(check_space, src, dst)
    if dst.size is None:
        dst.create(src.size)


def _report(src: Disk, dst: Disk, result: engine.Result, digests: Manifest,
            kernels: _native.Kernels) -> Report:
    st = result.stats
    return Report(
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


async def _verify(target: str, dst: Disk, digests: Manifest, kernels: _native.Kernels,
                  report: Report, on_progress: Callable[[Progress], None] | None,
                  tls: Tls | None) -> None:
    """copy --verify: read the target back and compare it with the digests just taken."""
    if dst.kind == "nbd":  # a single-connection server would make a second one wait
        dst.close()  # (a local target stays open: O_EXCL keeps holding the device)
    started = time.monotonic()
    count, offsets, read = await read_back(target, digests, kernels, on_progress=on_progress,
                                           tls=tls)
    report.verify_seconds = round(time.monotonic() - started, 6)
    report.verify_bytes_read = read
    if count:
        raise VerifyFailed(f"{count} blocks of {BLOCK} bytes read back differ from what "
                           f"was copied; the first", disk=dst.display, offset=offsets[0])
    report.verified = True


def copy(source: str, target: str, **options: Any) -> Report:
    """Blocking form of copy_async() for callers without an event loop."""
    return asyncio.run(copy_async(source, target, **options))
