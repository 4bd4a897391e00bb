"""The built-in example: a warm migration of a running disk, proven equal at the end.

No arguments to invent. A reproducible synthetic disk (random data,
text-like data, zero-filled blocks and holes) is held by a real
qemu-storage-daemon; a guest process writes to it at a steady rate with hot
spots through a writable NBD export (the "VM"). `transfer migrate` runs a
warm migration into a file: pass 0 copies everything, a few short precopy
passes copy what the dirty bitmaps name, then cutover stops the guest,
takes the final pass and reads the target back. The proof is independent of
the engine: the target is compared byte for byte with what the daemon
serves, and its digest is recomputed here with the xxhash package.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from typing import Callable

import xxhash

from ..errors import BadInput, VerifyFailed
from ..integrity import BLOCK, digest_string
from ..migration.migrate import migrate_async, request_cutover
from ..reports import MigrateReport, PassInfo
from ..observe.events import Progress
from .servers import QemuStorageDaemon
from .synth import make_image

DEMO_SIZE = 1 << 30
DEMO_RATE = 8 << 20  # bytes/s the guest writes
DEMO_PASSES = 3  # precopy passes after pass 0, one a second


def file_digest(path: str) -> str:
    """The disk digest of a file, computed with the xxhash package alone."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(xxhash.xxh3_128(block).digest())
            size += len(block)
    h.update(struct.pack("<QI", size, BLOCK))
    return digest_string(h.digest())


def first_difference(uri: str, path: str) -> int | None:
    """Where the NBD export at uri and the file first differ (read with plain libnbd)."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        if os.path.getsize(path) != size:
            return min(size, os.path.getsize(path))
        with open(path, "rb") as f:
            for off in range(0, size, 4 << 20):
                x = h.pread(min(4 << 20, size - off), off)
                y = f.read(len(x))
                if x != y:
                    return off + next(i for i in range(len(x)) if x[i] != y[i])
    finally:
        h.shutdown()
    return None


def pass_table(passes: list[PassInfo]) -> list[str]:
    def mib(x: float | None, unit: str = " MiB") -> str:
        return "-" if x is None else f"{x / 2**20:.1f}{unit}"

    rows = ["| pass | changed by | delta | seconds | copy rate | guest dirty rate | predicted downtime |",
            "|---|---|---|---|---|---|---|"]
    for p in passes:
        pred = "-" if p.predicted_downtime is None else f"{p.predicted_downtime:.2f} s"
        rows.append(f"| {p.pass_}{' final' if p.final else ''} | {p.change_source} | "
                    f"{mib(p.delta_bytes)} | {p.seconds:.2f} | {mib(p.copy_rate, ' MiB/s')} | "
                    f"{mib(p.dirty_rate, ' MiB/s')} | {pred} |")
    return rows


def run_demo(*, size: int = DEMO_SIZE, seed: int = 1, rate: float = DEMO_RATE,
             passes: int = DEMO_PASSES, say: Callable[[str], None] = print,
             on_progress: Callable[[Progress], None] | None = None) -> MigrateReport:
    if not QemuStorageDaemon.available():
        raise BadInput("the demo needs qemu-storage-daemon: run tools/setup")
    work = tempfile.mkdtemp(prefix="transfer-demo-")
    daemon = guest = None
    try:
        image, target = os.path.join(work, "source.raw"), os.path.join(work, "target.img")
        state = os.path.join(work, "state")
        stop, stopped = os.path.join(work, "STOP"), os.path.join(work, "STOPPED")
        layout = make_image(image, size, seed)
        say(f"source: {size >> 20} MiB synthetic disk (seed {seed}): "
            + ", ".join(f"{k.replace('_', ' ')} {v >> 20} MiB" for k, v in layout.items()))
        daemon = QemuStorageDaemon(os.path.join(work, "nbd.sock"), image,
                                   qmp=os.path.join(work, "qmp.sock"), fmt="raw").start()
        guest = subprocess.Popen([sys.executable, "-m", "transfer.demo.workload", daemon.uri,
                                  "--rate", str(rate), "--seed", str(seed), "--stop", stop,
                                  "--stopped", stopped], stdin=subprocess.DEVNULL)
        say(f"qemu-storage-daemon holds it as node disk0; a guest writes {rate / 2**20:g} MiB/s "
            f"into it (hot spots); warm migration into {target}, {passes} precopy passes a "
            "second apart, then cutover")

        def on_pass(p: PassInfo) -> None:
            pred = "" if p.predicted_downtime is None else \
                f", predicted downtime {p.predicted_downtime:.2f} s"
            say(f"pass {p.pass_}{' (final)' if p.final else ''}: {p.delta_bytes / 2**20:.1f} MiB "
                f"({p.change_source}) in {p.seconds:.2f} s{pred}")
            if p.pass_ >= passes and not p.final:
                request_cutover(state)

        report = asyncio.run(migrate_async(
            target, kind="warm", qmp=daemon.qmp, node=daemon.node, state=state,
            nbd_socket=daemon.sock, precopy_interval=1.0,
            on_cutover=f"sh -c 'touch {stop}; while [ ! -e {stopped} ]; do sleep 0.01; done'",
            cutover_timeout=60.0, on_pass=on_pass, on_progress=on_progress))
        guest.wait(timeout=30)
        diff = first_difference(daemon.uri, target)
        if diff is not None:
            raise VerifyFailed("the target differs from the source", disk=target, offset=diff)
        independent = file_digest(target)
        if independent != report.digest:
            raise VerifyFailed(f"digest {report.digest} reported, {independent} recomputed",
                               disk=target)
        for row in pass_table(report.passes):
            say(row)
        c = report.cutover
        say(f"cutover: downtime {c['downtime']:.2f} s measured, {c['predicted_downtime']:.2f} s "
            "predicted")
        say(f"proved equal: byte-for-byte compare with what the daemon serves, and digest "
            f"{independent} recomputed independently")
        return report
    finally:
        if guest is not None and guest.poll() is None:
            guest.kill()  # our own child
            guest.wait()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
