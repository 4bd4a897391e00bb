"""VMware changed block tracking output: a changed-areas file, validated.

The file is JSON shaped like vSphere's DiskChangeInfo (QueryChangedDiskAreas):

    {"startOffset": 0, "length": 10737418240,
     "changedArea": [{"start": 65536, "length": 4096}, ...]}

It is untrusted input. Every field must be a whole number (not a bool, not a
float); areas must have a positive length and lie inside both the covered
range [startOffset, startOffset+length) and the disk. Areas may come in any
order and may overlap: they are sorted and merged. Then they are rounded
outward to whole blocks (R2: a partially changed block is copied whole) and
merged again. Anything else is a BadInput naming the file and what is wrong;
nothing is ever read as "no changes" by mistake.
"""

from __future__ import annotations

import json
import os

from .._native import kernels
from ..errors import BadInput
from ..integrity import BLOCK
from ..runs import Runs

MAX_FILE_BYTES = 256 << 20  # a DiskChangeInfo of millions of areas is far smaller
MAX_AREAS = 16 << 20


class AreasError(BadInput):
    kind = "changed-areas"


def _int(value: object, what: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AreasError(f"{what} is {value!r}, not a whole number", disk=path)
    if value < 0:
        raise AreasError(f"{what} is negative ({value})", disk=path)
    return value


def load_changed_areas(path: str, size: int, block: int = BLOCK) -> Runs:
    """The changed ranges of a disk of size bytes: sorted, disjoint, block-aligned runs (an end
    may be the size).

    Sorted, merged, rounded outward to block and clipped to size. The merging
    and the rest of the interval algebra below run in the native kernel
    (native/intervals.pyx; its twin in transfer/_native/_reference.py), not in
    numpy: importing numpy costs a pass 55-85 ms here, more than the whole
    planning of 100,000 areas.
    """
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            raise AreasError(f"larger than {MAX_FILE_BYTES >> 20} MiB", disk=path)
        with open(path, "rb") as f:
            doc = json.load(f)
    except OSError as e:
        raise AreasError(f"cannot read: {os.strerror(e.errno) if e.errno else e}",
                         disk=path) from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise AreasError(f"not JSON: {e}", disk=path) from None
    if not isinstance(doc, dict):
        raise AreasError("not a DiskChangeInfo object", disk=path)
    for key in ("startOffset", "length", "changedArea"):
        if key not in doc:
            raise AreasError(f"has no {key!r}", disk=path)
    first = _int(doc["startOffset"], "startOffset", path)
    covered = _int(doc["length"], "length", path)
    if first + covered > size:
        raise AreasError(f"covers [{first}, {first + covered}), past the disk's {size} bytes",
                         disk=path)
    areas = doc["changedArea"]
    if not isinstance(areas, list):
        raise AreasError("changedArea is not a list", disk=path)
    if len(areas) > MAX_AREAS:
        raise AreasError(f"has {len(areas)} areas, more than {MAX_AREAS}", disk=path)
    runs = _fast_runs(areas, first, first + covered)
    if runs is None:
        runs = []
        for i, area in enumerate(areas):  # the slow way, which names the first bad area
            if not isinstance(area, dict) or set(area) - {"start", "length"} or len(area) != 2:
                raise AreasError(f"changedArea[{i}] is not {{\"start\": N, \"length\": N}}",
                                 disk=path)
            start = _int(area["start"], f"changedArea[{i}].start", path)
            length = _int(area["length"], f"changedArea[{i}].length", path)
            if length == 0:
                raise AreasError(f"changedArea[{i}] has length 0", disk=path)
            if start < first or start + length > first + covered:
                raise AreasError(f"changedArea[{i}] [{start}, {start + length}) is outside the "
                                 f"covered range [{first}, {first + covered})", disk=path)
            runs.append((start, start + length))
    return merge_runs(runs, size, block)


def _fast_runs(areas: list, lo: int, hi: int) -> list[tuple[int, int]] | None:
    """(start, end) runs of well-formed areas in one sweep, or None when any area is malformed
    (the per-area loop then says which and why)."""
    try:
        runs = [(a["start"], a["start"] + a["length"]) for a in areas
                if type(a) is dict and len(a) == 2 and type(a["start"]) is int
                and type(a["length"]) is int and a["length"] > 0]
    except (KeyError, TypeError):
        return None
    if len(runs) != len(areas):
        return None
    for s, e in runs:
        if s < lo or e > hi:
            return None
    return runs


def merge_runs(runs, size: int, block: int = BLOCK) -> Runs:
    """[start, end) runs in any order -> sorted, merged, rounded outward to block, clipped."""
    return kernels().merge_runs(runs, size, block)


def union_runs(a: Runs, b: Runs, size: int) -> Runs:
    """The union of two sets of sorted, disjoint, block-aligned runs."""
    return kernels().merge_runs(Runs.of(a) + b, size, BLOCK)


def subtract_runs(a: Runs, b: Runs) -> Runs:
    """Runs of a not covered by b (both sorted and disjoint)."""
    return kernels().subtract_runs(a, b)


def clip_runs(a: Runs, start: int, end: int) -> Runs:
    """The parts of runs a inside [start, end)."""
    return kernels().clip_runs(a, start, end)


def runs_bytes(a: Runs) -> int:
    return kernels().runs_bytes(a)
