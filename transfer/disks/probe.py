"""Signatures that mean "this disk holds something": refuse to overwrite without --force.

Local targets are probed with util-linux's `blkid -p` (it knows hundreds of
formats); NBD targets, which blkid cannot open, with this table of the
common ones, read from the first 68 KiB.
"""

from __future__ import annotations

import subprocess
from typing import Callable

PROBE_BYTES = 68 * 1024

# (offset, magic, name)
MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"XFSB", "xfs"),
    (0, b"LUKS\xba\xbe", "crypto_LUKS"),
    (0, b"QFI\xfb", "qcow2"),
    (3, b"NTFS    ", "ntfs"),
    (54, b"FAT12   ", "vfat"),
    (54, b"FAT16   ", "vfat"),
    (82, b"FAT32   ", "vfat"),
    (510, b"\x55\xaa", "dos partition table or boot sector"),
    (512, b"EFI PART", "gpt"),
    (512, b"LABELONE", "LVM2_member"),
    (1080, b"\x53\xef", "ext2/3/4"),
    (4086, b"SWAPSPACE2", "swap"),
    (4096, b"EFI PART", "gpt"),
    (32769, b"CD001", "iso9660"),
    (65600, b"_BHRfS_M", "btrfs"),
)


def probe_signature(read: Callable[[int, int], bytes]) -> str | None:
    head = read(0, PROBE_BYTES)
    for offset, magic, name in MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def blkid_signature(path: str) -> str | None:
    """What `blkid -p` finds on path (TYPE or PTTYPE), None when it finds nothing."""
    try:
        p = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True,
                           text=True, timeout=60)
    except FileNotFoundError:
        raise RuntimeError("blkid (util-linux) is needed to check the target for signatures") from None
    if p.returncode == 2:  # nothing found
        return None
    if p.returncode != 0:
        raise RuntimeError(f"blkid -p {path} failed: {p.stderr.strip() or p.returncode}")
    fields = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    return fields.get("TYPE") or fields.get("PTTYPE") or "unknown signature"
