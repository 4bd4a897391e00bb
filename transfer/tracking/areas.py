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

from ..errors import BadInput
from ..integrity import BLOCK

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


def load_changed_areas(path: str, size: int, block: int = BLOCK):
    """The changed ranges of a disk of size bytes, as an (n, 2) int64 array of [start, end).

    Sorted, merged, rounded outward to block and clipped to size.
    """
    import numpy as np

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
    if runs is not None:
        return merge_runs(runs, size, block)
    runs = np.empty((len(areas), 2), dtype=np.int64)
    for i, area in enumerate(areas):  # the slow way, which names the first bad area
        if not isinstance(area, dict) or set(area) - {"start", "length"} or len(area) != 2:
            raise AreasError(f"changedArea[{i}] is not {{\"start\": N, \"length\": N}}", disk=path)
        start = _int(area["start"], f"changedArea[{i}].start", path)
        length = _int(area["length"], f"changedArea[{i}].length", path)
        if length == 0:
            raise AreasError(f"changedArea[{i}] has length 0", disk=path)
        if start < first or start + length > first + covered:
            raise AreasError(f"changedArea[{i}] [{start}, {start + length}) is outside the "
                             f"covered range [{first}, {first + covered})", disk=path)
        runs[i] = (start, start + length)
    return merge_runs(runs, size, block)


def _fast_runs(areas: list, lo: int, hi: int):
    """[start, end) runs of well-formed areas in one vectorized sweep, or None when any area
    is malformed (the per-area loop then says which and why)."""
    import numpy as np

    try:
        pairs = [(a["start"], a["length"]) for a in areas if type(a) is dict and len(a) == 2]
    except KeyError:
        return None
    if len(pairs) != len(areas) or not all(type(x) is int for pair in pairs for x in pair):
        return None
    try:
        arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    except OverflowError:
        return None
    starts, lengths = arr[:, 0], arr[:, 1]
    if (starts < lo).any() or (lengths <= 0).any() or (starts > hi - lengths).any():
        return None
    return np.stack((starts, starts + lengths), axis=1)


def merge_runs(runs, size: int, block: int = BLOCK):
    """[start, end) runs in any order -> sorted, merged, rounded outward to block, clipped."""
    import numpy as np

    if len(runs) == 0:
        return np.empty((0, 2), dtype=np.int64)
    starts = runs[:, 0] // block * block
    ends = np.minimum(-(-runs[:, 1] // block) * block, size)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    # a new run begins where a start lies past every end before it
    begin = np.concatenate(([0], np.flatnonzero(starts[1:] > ends[:-1]) + 1))
    stop = np.concatenate((begin[1:] - 1, [len(starts) - 1]))
    return np.stack((starts[begin], ends[stop]), axis=1)


def union_runs(a, b, size: int):
    """The union of two sets of sorted, disjoint, block-aligned runs."""
    import numpy as np

    return merge_runs(np.concatenate((np.asarray(a, np.int64).reshape(-1, 2),
                                      np.asarray(b, np.int64).reshape(-1, 2))), size)


def subtract_runs(a, b):
    """Runs of a not covered by b (both sorted and disjoint)."""
    import numpy as np

    out: list[tuple[int, int]] = []
    bl = np.asarray(b, np.int64).reshape(-1, 2).tolist()
    j = 0
    for s, e in np.asarray(a, np.int64).reshape(-1, 2).tolist():
        while j < len(bl) and bl[j][1] <= s:
            j += 1
        k = j
        while s < e:
            if k >= len(bl) or bl[k][0] >= e:
                out.append((s, e))
                break
            if bl[k][0] > s:
                out.append((s, bl[k][0]))
            s = max(s, bl[k][1])
            k += 1
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def clip_runs(a, start: int, end: int):
    """The parts of runs a inside [start, end)."""
    import numpy as np

    a = np.asarray(a, np.int64).reshape(-1, 2)
    a = np.stack((np.maximum(a[:, 0], start), np.minimum(a[:, 1], end)), axis=1)
    return a[a[:, 0] < a[:, 1]]
