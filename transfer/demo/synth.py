"""Synthetic disk images, reproducible from a seed, for the demo, tests and benchmarks.

A realistic mix of what VM disks hold: runs of random (incompressible) data,
text-like compressible data, allocated blocks filled with zeros, and holes,
in runs of 1-32 MiB; inside data runs some 64 KiB blocks are zero, so the
zero scan has work. `allocated` is the fraction of the disk that is not a
hole. The same (size, seed, allocated) gives the same bytes everywhere.
"""

from __future__ import annotations

import os

import numpy as np

MiB = 1 << 20
_WORDS = (b"the disk block copy of a virtual machine moves data zero hole extent "
          b"kubevirt forklift warm cold cutover bitmap checkpoint journal manifest "
          b"error retry flush sync verify digest 0123456789 ERROR INFO DEBUG /var/log").split()


def _text(rng: np.random.Generator, n: int) -> bytes:
    idx = rng.integers(0, len(_WORDS), n // 4 + 16)
    out = b" ".join(_WORDS[i] for i in idx)
    return out[:n]


def make_image(path: str, size: int, seed: int = 1, *, allocated: float = 0.5) -> dict[str, int]:
    """Write the image to path (created or truncated, sparse) and return bytes per kind."""
    rng = np.random.default_rng(seed)
    text = _text(rng, 8 * MiB)
    counts = {"random": 0, "text": 0, "zero_allocated": 0, "hole": 0}
    data_kinds = ("random", "text", "zero_allocated")
    data_weights = np.array([0.4, 0.4, 0.2])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        pos = 0
        while pos < size:
            run = min(int(rng.integers(1, 33)) * MiB, size - pos)
            if rng.random() >= allocated:
                counts["hole"] += run
                pos += run
                continue
            kind = data_kinds[int(rng.choice(3, p=data_weights))]
            for off in range(pos, pos + run, MiB):
                n = min(MiB, pos + run - off)
                if kind == "random":
                    chunk = bytearray(rng.bytes(n))
                elif kind == "text":
                    start = int(rng.integers(0, len(text) - n))
                    chunk = bytearray(text[start : start + n])
                else:
                    chunk = bytearray(n)
                if kind != "zero_allocated":
                    for b in range(0, n, 64 * 1024):
                        if rng.random() < 0.05:
                            chunk[b : b + 64 * 1024] = bytes(len(chunk[b : b + 64 * 1024]))
                os.pwrite(fd, chunk, off)
            counts[kind] += run
            pos += run
    finally:
        os.close(fd)
    return counts
