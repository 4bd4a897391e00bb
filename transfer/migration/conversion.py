"""Conversion: a storage vendor pre-populated the target; prove it. checksum() gives a disk's
digest, verify() compares a target with a source (block by block) or with a digest.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Callable

from .. import _native
from ..disks import Disk, open_disk
from ..errors import BadInput, VerifyFailed
from ..integrity import Manifest
from ..pipeline.retry import RETRIES
from ..observe.events import Progress
from ..pipeline.shape import check_retries
from ..reports import ChecksumReport, VerifyReport
from ..tls import Tls
from .verify import VERIFY_OFFSETS, scan

_DIGEST = re.compile(r"^xxh3-128:64k:[0-9a-f]{32}$")


async def checksum_async(disk: str, *, connections: int | None = None,
                         in_flight: int | None = None, request_size: int | None = None,
                         manifest: str | None = None, retries: int = RETRIES,
                         on_progress: Callable[[Progress], None] | None = None,
                         native: str | None = None, tls: Tls | None = None) -> ChecksumReport:
    """The disk digest of disk (holes and zero extents hashed without reading).

    Local disks are read with O_DIRECT: the digest is of what the device holds,
    not of what the page cache holds. manifest: also write the per-block
    digests to this file. retries, tls: as for copy().
    """
    check_retries(retries)
    kernels = _native.kernels(native)
    d = await asyncio.to_thread(open_disk, disk, "source", direct=True, kernels=kernels, tls=tls)
    digests: Manifest | None = None
    try:
        digests = Manifest.create(manifest, d.size) if manifest else Manifest(d.size)
        result = await scan(d, digests, kernels, size=d.size, connections=connections,
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


async def verify_async(source: str | None, target: str, *, expect: str | None = None,
                       retries: int = RETRIES,
                       on_progress: Callable[[Progress], None] | None = None,
                       native: str | None = None, tls: Tls | None = None) -> VerifyReport:
    """Compare target with source block by block (both read at once), or with a digest.

    The conversion migration type: someone else populated target. Local disks
    are read with O_DIRECT. A target larger than the source is compared over
    the source's size (a PVC is often larger); a smaller one differs. Never
    retried: a difference is reported, and verify() callers get equal=False (a failed
    read is, up to retries times, as for copy()). tls: as for copy().
    """
    check_retries(retries)
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
            scan(d, m, kernels, size=size, connections=None, in_flight=None, request_size=None,
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
