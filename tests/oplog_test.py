"""Which operations the engine issues: no read of a hole, no data write of a zero run.

nbdkit's log filter records every request on the source and on the target
(nbdcopy's copy-sparse.sh does the same with nbdkit eval).
"""

from __future__ import annotations

import os
import re

import transfer

from .conftest import expected_digest_of_file

MiB = 1 << 20
K64 = 64 * 1024
_OP = re.compile(r"connection=\d+ (Read|Write|Zero|Trim) id=\d+ offset=(0x[0-9a-f]+) "
                 r"count=(0x[0-9a-f]+)")


def ops(logfile: str) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {"Read": [], "Write": [], "Zero": [], "Trim": []}
    with open(logfile) as f:
        for line in f:
            m = _OP.search(line)
            if m:
                off, count = int(m.group(2), 16), int(m.group(3), 16)
                out[m.group(1)].append((off, off + count))
    return out


def overlaps(ranges, start, end):
    return [r for r in ranges if r[0] < end and start < r[1]]


def covered(ranges, start, end):
    pos = start
    for s, e in sorted(ranges):
        if s <= pos < e:
            pos = e
    return pos >= end


def test_holes_are_not_read_and_zero_runs_are_not_written(nbdkit, tmp_path):
    # [0,1M) data | [1M,3M) hole | [3M,4M) data with a zero 64 KiB block at 3M+128K |
    # [4M,5M) allocated zeros | [5M,6M) hole
    image = str(tmp_path / "src.img")
    with open(image, "wb") as f:
        f.truncate(6 * MiB)
        f.seek(0)
        f.write(os.urandom(MiB))
        f.seek(3 * MiB)
        f.write(os.urandom(128 * 1024) + bytes(K64) + os.urandom(MiB - 128 * 1024 - K64))
        f.seek(4 * MiB)
        f.write(bytes(MiB))
    src_log, dst_log = str(tmp_path / "src.log"), str(tmp_path / "dst.log")
    src = nbdkit("file", image, f"logfile={src_log}", readonly=True, filters=["log"])
    dst = nbdkit("memory", str(6 * MiB), f"logfile={dst_log}", filters=["log"])
    report = transfer.copy(src.uri, dst.uri)
    src.stop()
    dst.stop()
    assert report.digest == expected_digest_of_file(image)

    reads = ops(src_log)["Read"]
    assert reads, "the source log shows no reads at all"
    assert not overlaps(reads, 1 * MiB, 3 * MiB), "a hole was read"
    assert not overlaps(reads, 5 * MiB, 6 * MiB), "a hole was read"
    assert covered(reads, 0, MiB) and covered(reads, 3 * MiB, 5 * MiB)

    target = ops(dst_log)
    zero_runs = [(1 * MiB, 3 * MiB), (3 * MiB + 128 * 1024, 3 * MiB + 128 * 1024 + K64),
                 (4 * MiB, 5 * MiB), (5 * MiB, 6 * MiB)]
    for start, end in zero_runs:
        assert not overlaps(target["Write"], start, end), f"zero run {start:#x} written as data"
        assert covered(target["Zero"] + target["Trim"], start, end), f"zero run {start:#x} not zeroed"
    assert covered(target["Write"], 0, MiB)
    assert report.bytes_copied == 2 * MiB - K64
    assert report.bytes_zeroed == 4 * MiB + K64
