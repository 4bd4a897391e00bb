"""The downtime model of `transfer migrate` (transfer.migration.live.Model), fed pass reports directly.

Issue 12: the final read-back is costed by the bytes unverified at the stop (the final delta and
what a crash left), at the read-back rate pass 0's own read-back measured; not by the disk. And
a pass's read-back is not mistaken for copy time.
"""

from __future__ import annotations

import pytest

from transfer.migration.live import Model
from transfer.reports import SyncReport

MiB = 1 << 20
GiB = 1 << 30


def report(seconds: float, moved: int, delta: int, read_back: tuple[int, float] | None
           ) -> SyncReport:
    """A pass's report: seconds in all, bytes moved, bytes planned, (bytes, seconds) read back."""
    return SyncReport(
        source="nbd+unix:///src", target="t.img", state="st", pass_=0, checkpoint=None,
        change_source="x", fallback=None, resumed=False, delta_bytes=delta, bytes_copied=moved,
        bytes_zeroed=0, bytes_skipped=0, bytes_unchanged=0, bytes_read=moved, seconds=seconds,
        digest="", size=0, commits=1,
        read_back=None if read_back is None else {"bytes": read_back[0], "planned": read_back[0],
                                                  "mismatched": 0, "seconds": read_back[1]})


def model_after(data: int) -> Model:
    """Pass 0 over `data` bytes at 400 MiB/s, read back at 1 GiB/s; then a 20 MiB delta pass
    recorded over 5 s (4 MiB/s) that took a fixed 0.05 s besides its copy and read-back."""
    m = Model()
    copy, back = data / (400 * MiB), data / GiB
    m.add(report(copy + back, data, data, (data, back)), None)
    d = 20 * MiB
    m.add(report(0.05 + d / (400 * MiB) + d / GiB, d, d, (d, d / GiB)), 5.0)
    return m


def test_the_prediction_does_not_grow_with_the_disk():
    """Two disks, 1 and 16 GiB of data, the same guest: the same predicted downtime (it used
    to add the whole disk's read-back: 16 s more here)."""
    small, big = model_after(1 * GiB), model_after(16 * GiB)
    p_small, p_big = small.predict(5.0, 0), big.predict(5.0, 0)
    assert p_small == pytest.approx(p_big, rel=1e-6)
    # 0.05 fixed + 20 MiB copied at 400 MiB/s + 20 MiB read back at 1 GiB/s
    assert p_small == pytest.approx(0.05 + 20 / 400 + 20 / 1024, rel=1e-3)


def test_rates_come_from_pass_0_with_its_read_back_kept_apart():
    """Pass 0's copy rate excludes its read-back (else a pass that reads back all it wrote
    would look half as fast), and its read-back gives the read-back rate."""
    m = model_after(4 * GiB)
    assert m.copy_rate == pytest.approx(400 * MiB, rel=1e-6)
    assert m.read_rate == pytest.approx(GiB, rel=1e-6)
    assert m.overhead == pytest.approx(0.05, rel=1e-3)
    assert m.dirty_rate == pytest.approx(4 * MiB, rel=1e-6)


def test_unverified_bytes_and_a_source_rehash_are_costed():
    """What a crash left unverified is read back at the stop, and --verify source reads the
    source's data at the copy rate: both are in the prediction, at their rates."""
    m = model_after(1 * GiB)
    base = m.predict(5.0, 0)
    assert m.predict(5.0, 512 * MiB) == pytest.approx(base + 0.5, rel=1e-3)
    assert m.predict(5.0, 0, source_data=1 * GiB) == pytest.approx(base + 1024 / 400, rel=1e-3)


def test_the_overhead_counts_the_whole_pass_qmp_included():
    """A pass's wall in migrate (QMP hand-over and export around sync) beyond its copy and
    read-back is the fixed cost a final pass will take too: the median of the small passes'."""
    m = model_after(1 * GiB)
    d = 20 * MiB
    work = d / (400 * MiB) + d / GiB
    for qmp in (0.02, 0.03, 0.5):  # one slow outlier does not move the median far
        m.add(report(0.05 + work, d, d, (d, d / GiB)), 5.0, wall=0.05 + work + qmp)
    assert m.overhead == pytest.approx(0.05 + 0.025, rel=1e-3)


def test_no_prediction_before_a_dirty_rate():
    m = Model()
    m.add(report(2.0, GiB, GiB, (GiB, 1.0)), None)
    assert m.predict(1.0, 0) is None
