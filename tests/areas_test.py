"""Changed-areas files (VMware DiskChangeInfo): validated, sorted, merged, rounded to blocks."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transfer.errors import BadInput
from transfer.tracking.areas import AreasError, load_changed_areas

B = 64 * 1024
SIZE = 40 * B + 777  # a disk whose last block is short


def write(tmp_path, doc) -> str:
    path = tmp_path / "areas.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def blocks_of(runs) -> set[int]:
    return {b for start, end in runs for b in range(start // B, -(-end // B))}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 5 * B)), max_size=40),
       st.randoms())
def test_areas_in_any_order_become_the_changed_blocks(tmp_path_factory, raw, rnd):
    areas = [{"start": s, "length": min(n, SIZE - s)} for s, n in raw]
    rnd.shuffle(areas)
    path = write(tmp_path_factory.mktemp("a"),
                 {"startOffset": 0, "length": SIZE, "changedArea": areas})
    runs = load_changed_areas(path, SIZE)
    expected = blocks_of((a["start"], a["start"] + a["length"]) for a in areas)
    assert blocks_of(runs) == expected
    for (_, e1), (s2, _) in zip(runs, runs[1:]):
        assert e1 < s2  # sorted, merged: no overlap, no touching
    for s, e in runs:
        assert s % B == 0 and (e % B == 0 or e == SIZE) and e <= SIZE


def test_many_thousands_of_areas(tmp_path):
    rng = random.Random(1)
    size = 1 << 40
    areas = [{"start": rng.randrange(0, size - B), "length": rng.randrange(1, B)}
             for _ in range(200_000)]
    path = write(tmp_path, {"startOffset": 0, "length": size, "changedArea": areas})
    runs = load_changed_areas(path, size)
    assert 0 < len(runs) <= len(areas)
    assert all(b[0] > a[1] for a, b in zip(runs, runs[1:]))


def test_no_areas_is_no_change(tmp_path):
    path = write(tmp_path, {"startOffset": 0, "length": SIZE, "changedArea": []})
    assert load_changed_areas(path, SIZE) == []


@pytest.mark.parametrize("doc, match", [
    ("{", "not JSON"),
    ("[]", "not a DiskChangeInfo"),
    ({"startOffset": 0, "length": SIZE}, "has no 'changedArea'"),
    ({"startOffset": 0, "length": SIZE + 1, "changedArea": []}, "past the disk"),
    ({"startOffset": -1, "length": 5, "changedArea": []}, "negative"),
    ({"startOffset": 0, "length": SIZE, "changedArea": {}}, "not a list"),
    ({"startOffset": 0, "length": SIZE, "changedArea": [{"start": 0}]}, "is not"),
    ({"startOffset": 0, "length": SIZE, "changedArea": [{"start": 0, "length": 0}]}, "length 0"),
    ({"startOffset": 0, "length": SIZE, "changedArea": [{"start": 1.5, "length": 3}]},
     "not a whole number"),
    ({"startOffset": 0, "length": SIZE, "changedArea": [{"start": True, "length": 3}]},
     "not a whole number"),
    ({"startOffset": B, "length": B, "changedArea": [{"start": 0, "length": 3}]},
     "outside the covered range"),
    ({"startOffset": 0, "length": SIZE, "changedArea": [{"start": SIZE - 1, "length": 2}]},
     "outside the covered range"),
])
def test_bad_files_are_refused_naming_what_is_wrong(tmp_path, doc, match):
    path = write(tmp_path, doc)
    with pytest.raises(AreasError, match=match) as e:
        load_changed_areas(path, SIZE)
    assert isinstance(e.value, BadInput) and path in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(AreasError, match="cannot read"):
        load_changed_areas(str(tmp_path / "nope.json"), SIZE)
