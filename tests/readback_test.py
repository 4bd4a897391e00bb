"""Verification during precopy (issue 12) against real components: every pass reads back what
the passes since the last read-back wrote, so that a warm migration's cutover reads back only
its own delta, plus whatever a crash or a failed read-back left unverified.

The rules these tests protect, each by a CLI test (sync or migrate, as a user runs them) and a
second, independent one:

  R-caught   a target that corrupts a write is caught by the read-back of the pass that wrote
             it (before the stop), and the next pass writes the block again; the migration ends
             with the target equal, never with it wrong.
  R-pending  a pass killed between its copy and its read-back leaves its ranges pending: the
             rerun reads them back before the state can complete (a --final cannot complete
             over a block that was never read back).

The corrupting target is nbdkit's sh plugin over a file, corrupting the first write that covers
a chosen block (a marker file makes it happen once). The kill window is made by nbdkit's delay
filter on reads only: the copy's writes are fast, the read-back's reads slow. Tests wait for
journal records, never for time.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from transfer.demo.servers import Nbdkit
from transfer.state.journal import Journal, JournalError, encode
from transfer.state.ranges_file import read_ranges
from transfer.state.records import State, load_state as _load, pending_ranges as _pending

from .conftest import compare, expected_digest_of_file
from .migrate_test import check_target, vm  # noqa: F401 (vm is a fixture)
from .sync_test import journal_records, make_disk, sync, write_areas

MiB = 1 << 20
BLOCK = 64 * 1024
WARNING = "blocks read back from the target differ from what was written; the next pass " \
          "writes them again"

# nbdkit sh plugin: the file $F as an NBD export, except that the first write covering the
# byte $BAD is corrupted after it landed (the marker $MARK makes it once); reads, zeroes and
# flushes work on the file.
CORRUPTING = r"""#!/bin/sh
F=@FILE@ BAD=@BAD@ MARK=@MARK@
case "$1" in
  get_size) stat -Lc %s "$F" ;;
  can_write|can_flush|can_zero) exit 0 ;;
  can_trim|can_extents|can_multi_conn|can_fast_zero) exit 3 ;;
  can_fua|can_cache) echo none ;;
  pread) exec dd if="$F" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
  pwrite)
    dd of="$F" seek="$4" bs=1M conv=notrunc oflag=seek_bytes status=none || exit 1
    if [ ! -e "$MARK" ] && [ "$4" -le "$BAD" ] && [ $(($4 + $3)) -gt "$BAD" ]; then
      touch "$MARK"
      printf 'the target lost this write' |
        dd of="$F" seek="$BAD" conv=notrunc oflag=seek_bytes status=none || exit 1
    fi ;;
  zero) exec dd if=/dev/zero of="$F" seek="$4" count="$3" bs=1M conv=notrunc \
          oflag=seek_bytes iflag=count_bytes status=none ;;
  flush) exec sync "$F" ;;
  *) exit 2 ;;
esac
"""


def corrupting_target(nbdkit, tmp_path, size: int, bad: int):
    """A started nbdkit serving a new zeroed file of size bytes that corrupts the first write
    covering offset bad; (server, the file, the marker that says the corruption happened)."""
    image, mark, script = tmp_path / "target.img", tmp_path / "corrupted", tmp_path / "target.sh"
    with open(image, "wb") as f:
        f.truncate(size)
    script.write_text(CORRUPTING.replace("@FILE@", str(image)).replace("@BAD@", str(bad))
                      .replace("@MARK@", str(mark)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return nbdkit("sh", str(script)), str(image), mark


def read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def spoil(path: str, offset: int) -> None:
    """Write behind the engine: the target's storage loses what was there."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"written behind the engine")
        f.flush()
        os.fsync(f.fileno())


def kinds(records: list[dict]) -> list[tuple[str, int | None]]:
    return [(r["t"], r.get("pass")) for r in records]


def wait_for_record(state, p: subprocess.Popen, check, what: str, deadline: float = 120.0) -> list:
    """Poll the journal (read-only: journal_records never locks) until check(records) holds; fail
    if the process p ends first or the deadline passes. Returns the records."""
    end = time.monotonic() + deadline
    while True:
        records = journal_records(state)
        if check(records):
            return records
        assert p.poll() is None, f"the engine ended (exit {p.returncode}) before {what}"
        assert time.monotonic() < end, f"no {what} within {deadline:g} s: {kinds(records)}"
        time.sleep(0.02)


def ended_not_verified(n: int):
    """The journal holds pass n's end record and no verified record after it."""
    def check(records: list[dict]) -> bool:
        ends = [i for i, r in enumerate(records) if r["t"] == "end" and r["pass"] == n]
        return bool(ends) and not any(r["t"] == "verified" for r in records[ends[0]:])
    return check


# -- R-caught: a corrupting target, caught by the pass that wrote it


def test_a_corrupting_target_is_caught_by_the_pass_and_rewritten_by_the_next(nbdkit, tmp_path):
    """R-caught through the sync CLI: pass 0's write of a data block is corrupted by the target;
    pass 0's own read-back finds it (exit 0, a warning on stderr, JSON progress lines of phase
    "copy" then "read-back", the report's read_back.mismatched 1), the next pass, told nothing
    changed, writes that block again (rewritten 64 KiB, its read-back clean), and --final
    completes with the target equal to the source byte for byte."""
    size, bad = 8 * MiB, 3 * MiB + 100
    src, state, empty = str(tmp_path / "src.img"), tmp_path / "state", tmp_path / "none.json"
    make_disk(src, size, 16)
    assert read_at(src, 3 * MiB, BLOCK) != bytes(BLOCK)  # a data block: it is written
    dst, image, mark = corrupting_target(nbdkit, tmp_path, size, bad)
    write_areas(empty, size, [])

    p = subprocess.run([sys.executable, "-m", "transfer.cli", "sync", src, dst.uri, "--state",
                        str(state), "--checkpoint", "c0", "--progress", "json", "--report",
                        str(tmp_path / "r0.json")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert mark.exists()  # the target did corrupt the write
    assert f"1 {WARNING}" in p.stderr, p.stderr
    events = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    phases = [e["phase"] for e in events if e["event"] == "progress"]
    assert "copy" in phases and phases[-1] == "read-back", phases  # the read-back comes last
    r = json.loads((tmp_path / "r0.json").read_text())
    assert r["read_back"]["mismatched"] == 1 and r["read_back"]["bytes"] > 0, r["read_back"]
    assert any("offset 3145728" in n for n in r["notes"]), r["notes"]
    assert read_at(image, bad, 10) == b"the target"  # still wrong: pass 0 did not complete it
    assert ("verified", 0) in kinds(journal_records(state))

    r = sync(src, dst.uri, state, "--changed-areas", str(empty), "--checkpoint", "c1")
    assert r["rewritten"] == BLOCK and any("written again" in n for n in r["notes"]), r
    assert r["read_back"]["mismatched"] == 0 and r["read_back"]["planned"] == BLOCK, r
    assert not r["complete"]
    assert read_at(image, 3 * MiB, BLOCK) == read_at(src, 3 * MiB, BLOCK)

    r = sync(src, dst.uri, state, "--changed-areas", str(empty), "--checkpoint", "c2", "--final")
    assert r["complete"] and r["rewritten"] == 0
    compare(src, image, size=size)
    assert expected_digest_of_file(image) == r["digest"]


def test_a_mismatch_left_to_the_final_pass_fails_it_and_the_next_pass_rewrites(nbdkit, tmp_path):
    """R-caught, the second guard: with --read-back final the corrupted write is not read back
    until --final, which then exits 6 naming the offset (never a completed state over it); the
    next pass, with no change named, rewrites the block and completes equal."""
    size, bad = 8 * MiB, 5 * MiB + MiB // 2 + 7
    src, state, empty = str(tmp_path / "src.img"), tmp_path / "state", tmp_path / "none.json"
    make_disk(src, size, 16)
    assert read_at(src, 5 * MiB + MiB // 2, BLOCK) != bytes(BLOCK)
    dst, image, mark = corrupting_target(nbdkit, tmp_path, size, bad)
    write_areas(empty, size, [])
    r = sync(src, dst.uri, state, "--checkpoint", "c0", "--read-back", "final")
    assert mark.exists() and r["read_back"] is None
    err = sync(src, dst.uri, state, "--changed-areas", str(empty), "--checkpoint", "c1",
               "--final", expect=6)["stderr"]
    assert "read back from the target differ" in err, err
    assert f"offset {5 * MiB + MiB // 2}" in err, err
    r = sync(src, dst.uri, state, "--changed-areas", str(empty), "--checkpoint", "c2", "--final")
    assert r["complete"] and r["rewritten"] == BLOCK and r["read_back"]["mismatched"] == 0
    compare(src, image, size=size)


def test_migrate_catches_a_corrupting_target_before_the_stop(vm, nbdkit, tmp_path):
    """R-caught through `transfer migrate --type warm` with a guest writing: pass 0's write of a
    data block is corrupted by the target; pass 0's read-back (its verified record, before the
    final pass began, i.e. before the VM was stopped) finds it, the final pass plans that block
    again, and the migration exits 0 with the target equal to the disk as the guest left it.
    (This replaces migrate_test's old cutover-read-back test: a block corrupted after its
    read-back is, by design, not read again at cutover.)"""
    v = vm(size=16 * MiB, seed=9, rate=1 * MiB, pattern="scattered")  # seed 9: data at 0
    bad = 100
    assert read_at(v.image, 0, BLOCK) != bytes(BLOCK)
    dst, image, mark = corrupting_target(nbdkit, tmp_path, v.size, bad)
    v.start_guest()
    state, report = tmp_path / "st", tmp_path / "r.json"
    p = subprocess.run(v.migrate_argv(dst.uri, state, "--type", "warm", "--cutover", "now",
                                      "--report", str(report)),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert mark.exists()
    records = journal_records(state / "sync")
    begins = [i for i, x in enumerate(records) if x["t"] == "begin"]
    final = max(begins)
    caught = [x for x in records[:final] if x["t"] == "verified" and x["mismatched"]]
    assert caught and caught[0]["pass"] == 0, kinds(records)  # before the stop
    plan = records[final]["ranges"]
    if plan != "all":  # the final pass planned the block again (the guest may have too)
        got = read_ranges(str(state / "sync" / plan["file"]), v.size, plan["check"],
                          plan["count"])
        assert any(s <= bad < e for s, e in got), got
    assert records[-1]["t"] == "complete"
    assert [x["mismatched"] for x in records[final:] if x["t"] == "verified"] == [0]
    check_target(v, image, json.loads(report.read_text()))


# -- R-pending: a kill between a pass and its read-back


def kill_pass_0_before_its_read_back(nbdkit, src: str, image: str, state, size: int) -> str:
    """Run pass 0 of src onto a fresh target file served by nbdkit with slow reads (the delay
    filter), SIGKILL it once its end record is journaled, before its read-back's verified
    record, and stop that server; the socket path, for a server of the same address."""
    with open(image, "wb") as f:
        f.truncate(size)
    slow = nbdkit("file", image, "delay-read=4", filters=["delay"])
    p = subprocess.Popen([sys.executable, "-m", "transfer.cli", "sync", src, slow.uri, "--state",
                          str(state), "--checkpoint", "c0", "--progress", "none"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_record(state, p, ended_not_verified(0), "pass 0's end record")
    finally:
        p.kill()  # our own child
        p.wait()
    slow.stop()  # the same address, without the delay, for the reruns
    return slow.sock


def test_a_kill_before_the_read_back_leaves_it_to_the_rerun(nbdkit, tmp_path):
    """R-pending through the sync CLI: pass 0 is SIGKILLed once its end record is journaled and
    before its verified record (reads are slowed by nbdkit's delay filter); a block it wrote is
    then corrupted in the target's file. The --final rerun, told nothing changed, must read the
    killed pass's ranges back: exit 6 naming that offset, not a completed state; one more pass
    rewrites the block and completes with the target equal."""
    size, bad = 8 * MiB, 3 * MiB + 100
    src, state, empty = str(tmp_path / "src.img"), tmp_path / "state", tmp_path / "none.json"
    image = str(tmp_path / "dst.img")
    make_disk(src, size, 16)
    assert read_at(src, 3 * MiB, BLOCK) != bytes(BLOCK)
    write_areas(empty, size, [])
    sock = kill_pass_0_before_its_read_back(nbdkit, src, image, state, size)
    assert ended_not_verified(0)(journal_records(state)), kinds(journal_records(state))
    spoil(image, bad)
    dst = Nbdkit(sock, "file", image).start()
    try:
        err = sync(src, dst.uri, state, "--changed-areas", str(empty), "--checkpoint", "c1",
                   "--final", expect=6)["stderr"]
        assert "read back from the target differ" in err and f"offset {3 * MiB}" in err, err
        assert not any(x["t"] == "complete" for x in journal_records(state))
        r = sync(src, dst.uri, state, "--changed-areas", str(empty), "--checkpoint", "c2",
                 "--final")
        assert r["complete"] and r["rewritten"] == BLOCK, r
    finally:
        dst.stop()
    compare(src, image, size=size)
    assert expected_digest_of_file(image) == r["digest"]


def test_a_non_final_rerun_reads_back_what_the_killed_pass_left(nbdkit, tmp_path):
    """R-pending, the second guard, without --final: after the kill between pass 0 and its
    read-back and the corruption of a block pass 0 wrote, the next precopy pass (a delta of
    one other block) reads back pass 0's ranges with its own, finds the block (exit 0, the
    warning), and the pass after writes it again; --final completes equal."""
    size, bad = 8 * MiB, 6 * MiB + 1
    src, state = str(tmp_path / "src.img"), tmp_path / "state"
    image = str(tmp_path / "dst.img")
    make_disk(src, size, 16)
    assert read_at(src, 6 * MiB, BLOCK) != bytes(BLOCK)
    sock = kill_pass_0_before_its_read_back(nbdkit, src, image, state, size)
    spoil(image, bad)
    with open(src, "r+b") as f:  # one change the next pass is told about
        f.seek(BLOCK)
        f.write(b"changed by the guest")
    one = write_areas(tmp_path / "one.json", size, [{"start": BLOCK, "length": 20}])
    empty = write_areas(tmp_path / "none.json", size, [])
    dst = Nbdkit(sock, "file", image).start()
    try:
        p = subprocess.run([sys.executable, "-m", "transfer.cli", "sync", src, dst.uri, "--state",
                            str(state), "--changed-areas", one, "--checkpoint", "c1",
                            "--progress", "none", "--report", str(tmp_path / "r1.json")],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert f"1 {WARNING}" in p.stderr, p.stderr
        r = json.loads((tmp_path / "r1.json").read_text())
        assert r["delta_bytes"] == BLOCK and r["read_back"]["planned"] == size, r  # pass 0's too
        assert r["read_back"]["mismatched"] == 1
        r = sync(src, dst.uri, state, "--changed-areas", empty, "--checkpoint", "c2")
        assert r["rewritten"] == BLOCK and r["read_back"]["mismatched"] == 0, r
        r = sync(src, dst.uri, state, "--changed-areas", empty, "--checkpoint", "c3", "--final")
        assert r["complete"]
    finally:
        dst.stop()
    compare(src, image, size=size)


def test_migrate_killed_before_its_read_back_never_completes_a_wrong_target(vm, nbdkit,
                                                                            tmp_path):
    """R-pending through `transfer migrate` with a guest writing: the migration is SIGKILLed
    between pass 0's end record and its verified record (target reads slowed by nbdkit's delay
    filter), a data block of the target file is then corrupted, and migrate is run again with
    --cutover now. The rerun's pass 0 finds its checkpoint ended but its read-back pending: it
    reads the killed pass's ranges back before the stop, finds the block, and the final pass
    writes it again; the migration exits 0 with the target equal to the disk (never exit 0
    over a wrong target)."""
    v = vm(size=16 * MiB, seed=9, rate=1 * MiB, pattern="scattered")  # seed 9: data at 0
    bad = 100
    assert read_at(v.image, 0, BLOCK) != bytes(BLOCK)
    image = str(tmp_path / "t.img")
    with open(image, "wb") as f:
        f.truncate(v.size)
    v.start_guest()
    state, report = tmp_path / "st", tmp_path / "r.json"
    slow = nbdkit("file", image, "delay-read=4", filters=["delay"])
    p = subprocess.Popen(v.migrate_argv(slow.uri, state, "--type", "warm",
                                        "--precopy-interval", "600s"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_record(state / "sync", p, ended_not_verified(0), "pass 0's end record")
    finally:
        p.kill()  # our own child
        p.wait()
    assert ended_not_verified(0)(journal_records(state / "sync"))
    slow.stop()  # the same address, without the delay, for the rerun
    spoil(image, bad)
    dst = Nbdkit(slow.sock, "file", image).start()
    try:
        p = subprocess.run(v.migrate_argv(dst.uri, state, "--type", "warm", "--cutover", "now",
                                          "--report", str(report)),
                           capture_output=True, text=True, timeout=180)
    finally:
        dst.stop()
    assert p.returncode == 0, p.stderr
    records = journal_records(state / "sync")
    final = max(i for i, x in enumerate(records) if x["t"] == "begin")
    # the rerun's pass 0 (a compare pass: its checkpoint was ended, and pass 0 names no
    # tracker) read back the killed pass's ranges with its own: before the stop
    caught = [x for x in records[:final] if x["t"] == "verified" and x["mismatched"]]
    assert caught, kinds(records)
    plan = records[final]["ranges"]
    if plan != "all":
        got = read_ranges(str(state / "sync" / plan["file"]), v.size, plan["check"],
                          plan["count"])
        assert any(s <= bad < e for s, e in got), got
    assert records[-1]["t"] == "complete"
    check_target(v, image, json.loads(report.read_text()))


# -- the journal side, without the CLI


def _rewrite_journal(state, records: list[dict]) -> None:
    with open(state / "journal", "wb") as f:
        f.write(b"TRJOURN1" + b"".join(encode(i + 1, x) for i, x in enumerate(records)))


def _load_state(state) -> State:
    with Journal.open(str(state / "journal"), create=False) as j:
        return _load(str(state), j)


def test_load_takes_a_verified_record_only_after_an_ended_pass(tmp_path):
    """The journal is untrusted input: a verified record that follows no ended pass, names
    another pass, or has no valid mismatched count is refused (JournalError), never taken as
    'all read back' (which would let --final skip the read-back of a pass)."""
    size = 2 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 3)
    sync(src, dst, state, "--checkpoint", "c0")
    records = journal_records(state)
    assert [r["t"] for r in records][-3:] == ["begin", "end", "verified"]
    assert _load_state(state).pending == []
    verified = records[-1]
    good = records[:-1]
    assert _load_state(state).pending == []
    for bad in (good[:-1] + [verified],  # no end before it: the pass is still in progress
                good + [{**verified, "pass": 1}],  # for another pass
                good + [{**verified, "mismatched": -1}],
                good + [{**verified, "mismatched": "0"}],
                good + [{k: x for k, x in verified.items() if k != "mismatched"}],
                good[:1] + [verified]):  # no pass at all
        _rewrite_journal(state, bad)
        with pytest.raises(JournalError):
            _load_state(state)
    _rewrite_journal(state, good)  # the kill before the read-back: pass 0 pending
    st = _load_state(state)
    assert [r["pass"] for r in st.pending] == [0]
    assert _pending(st, size) == [(0, size)]  # pass 0's plan was the whole disk


def test_pending_is_the_union_of_the_unverified_passes(tmp_path):
    """_pending: after a verified pass 0, two passes with --read-back final leave exactly the
    union of their planned ranges pending (read more, never less); an unusable ranges file of
    one of them makes it the whole disk, and a verified record empties it."""
    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 5)
    sync(src, dst, state, "--checkpoint", "c0")
    assert _load_state(state).pending == []
    a1 = write_areas(tmp_path / "a1.json", size, [{"start": BLOCK + 5, "length": 10},
                                                   {"start": 3 * MiB, "length": 2 * BLOCK}])
    a2 = write_areas(tmp_path / "a2.json", size, [{"start": 2 * BLOCK, "length": 1},
                                                   {"start": MiB, "length": BLOCK}])
    sync(src, dst, state, "--changed-areas", a1, "--checkpoint", "c1", "--read-back", "final")
    sync(src, dst, state, "--changed-areas", a2, "--checkpoint", "c2", "--read-back", "final")
    st = _load_state(state)
    assert [r["pass"] for r in st.pending] == [1, 2]
    want = [(BLOCK, 3 * BLOCK), (MiB, MiB + BLOCK), (3 * MiB, 3 * MiB + 2 * BLOCK)]
    assert [tuple(x) for x in _pending(st, size)] == want
    plan = st.pending[1]["ranges"]
    with open(state / plan["file"], "r+b") as f:  # the ranges file of pass 2 is damaged
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert _pending(_load_state(state), size) == [(0, size)]
    os.unlink(state / plan["file"])
    assert _pending(_load_state(state), size) == [(0, size)]
    # a pass's read-back clears everything pending before it
    records = journal_records(state)
    _rewrite_journal(state, records + [{"t": "verified", "state": records[0]["state"],
                                        "pass": 2, "bytes": 0, "mismatched": 0}])
    assert _load_state(state).pending == []
