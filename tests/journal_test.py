"""The journal: durable appends, torn tails discarded, corruption refused, one engine at a time."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transfer.errors import BadInput
from transfer.state.journal import MAGIC, Journal, JournalError, encode

RECORDS = [{"pass": 0, "done": [[0, 65536]]}, {"pass": 1, "checkpoint": "b1"},
           {"pass": 1, "done": [[131072, 65536]], "note": "x" * 300}]


def fill(path) -> bytes:
    with Journal.open(str(path)) as j:
        for r in RECORDS:
            j.append(r)
    return path.read_bytes()


def test_round_trip_and_sequence(tmp_path):
    path = tmp_path / "journal"
    data = fill(path)
    assert data.startswith(MAGIC) and not (tmp_path / "journal.tmp").exists()
    with Journal.open(str(path), create=False) as j:
        assert j.records == RECORDS and j.discarded == 0
        assert j.append({"pass": 2}) == 4
    with Journal.open(str(path)) as j:
        assert j.records == RECORDS + [{"pass": 2}]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_a_torn_tail_is_discarded_and_nothing_before_it(tmp_path_factory, cut):
    path = tmp_path_factory.mktemp("j") / "journal"
    data = fill(path)
    cut = len(MAGIC) + cut % (len(data) - len(MAGIC))
    path.write_bytes(data[:cut])
    with Journal.open(str(path)) as j:
        kept = list(j.records)
        assert kept == RECORDS[: len(kept)]  # a prefix, never a guess
        assert j.discarded == cut - len(MAGIC) - sum(len(encode(i + 1, r))
                                                    for i, r in enumerate(kept))
        j.append({"after": "crash"})
    with Journal.open(str(path)) as j:  # the tail was truncated away: the append is readable
        assert j.records == kept + [{"after": "crash"}]


def test_a_flipped_byte_in_the_last_record_drops_only_it(tmp_path):
    path = tmp_path / "journal"
    data = bytearray(fill(path))
    data[-20] ^= 0x40
    path.write_bytes(bytes(data))
    with Journal.open(str(path)) as j:
        assert j.records == RECORDS[:2] and j.discarded == len(encode(3, RECORDS[2]))


@pytest.mark.parametrize("where", ["payload", "sequence"])
def test_corruption_before_the_end_is_refused(tmp_path, where):
    path = tmp_path / "journal"
    data = bytearray(fill(path))
    first = len(MAGIC)
    if where == "payload":
        data[first + 14] ^= 0x01  # inside record 1's JSON: its checksum fails
    else:
        # a well-formed record 1 that claims to be record 7
        good = encode(7, RECORDS[0])
        data[first : first + len(good)] = good
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="corrupt at record 1") as e:
        Journal.open(str(path))
    assert isinstance(e.value, BadInput)
    assert path.read_bytes() == bytes(data)  # refused, and left as it was for a human


def test_not_a_journal(tmp_path):
    path = tmp_path / "journal"
    path.write_bytes(b"hello world")
    with pytest.raises(JournalError, match="wrong magic"):
        Journal.open(str(path))
    with pytest.raises(JournalError, match="does not exist"):
        Journal.open(str(tmp_path / "missing"), create=False)


def test_a_second_engine_is_refused(tmp_path):
    path = str(tmp_path / "journal")
    with Journal.open(path):
        with pytest.raises(JournalError, match="in use"):
            Journal.open(path)
        # another process too (flock is per open file description)
        pid = os.fork()
        if pid == 0:
            try:
                Journal.open(path)
                os._exit(0)
            except JournalError:
                os._exit(7)
        assert os.waitpid(pid, 0)[1] >> 8 == 7
    with Journal.open(path) as j:  # released on close
        assert j.records == []


def _record_starts(data: bytes) -> list[int]:
    starts, pos = [], len(MAGIC)
    while pos < len(data):
        starts.append(pos)
        pos += 12 + int.from_bytes(data[pos : pos + 4], "little") + 8
    return starts


@pytest.mark.parametrize("new_length", [0x40000000, "past the end"])
def test_a_corrupt_length_field_does_not_hide_the_records_after_it(tmp_path, new_length):
    """A length byte flipped in the first record: read as a torn tail it would silently drop
    every later record (the review found that); it is refused instead."""
    path = tmp_path / "journal"
    data = bytearray(fill(path))
    first = _record_starts(bytes(data))[0]
    length = (len(data) - first) + 100 if new_length == "past the end" else new_length
    data[first : first + 4] = length.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="corrupt at record 1"):
        Journal.open(str(path))
    assert path.read_bytes() == bytes(data)  # and nothing was truncated


def test_a_zero_filled_tail_is_a_torn_tail(tmp_path):
    """After a crash a file system may show the grown file with zeroes where the data was."""
    path = tmp_path / "journal"
    data = fill(path)
    path.write_bytes(data + bytes(300))
    with Journal.open(str(path)) as j:
        assert j.records == RECORDS and j.discarded == 300


# --- the journal's own storage (RELIABILITY.md T9, R6) and two engines (R8) ----------------------

import subprocess  # noqa: E402

from transfer.errors import StateIOError  # noqa: E402

from .statefs_test import tmpfs  # noqa: E402,F401  (the fixture)


def test_a_full_file_system_fails_an_append_cleanly(tmpfs):
    """A journal on an 8 KiB tmpfs: the append that does not fit raises StateIOError (exit 4,
    not "bad input, nothing was written"), the journal takes no more appends (R6), and the
    record cut short is a torn tail the next open discards."""
    fs = tmpfs("8k")
    path = str(fs / "journal")
    big = {"pad": "x" * 1500}
    with Journal.open(path) as j:
        with pytest.raises(StateIOError, match="append failed: No space left on device") as e:
            for _ in range(10):
                j.append(big)
        assert e.value.exit_code == 4 and not isinstance(e.value, BadInput)
        kept = list(j.records)
        assert kept and all(r == big for r in kept)
        with pytest.raises(StateIOError, match="refused after an earlier failure"):
            j.append({"small": 1})  # never retried, even what would fit
    subprocess.run(["mount", "-o", "remount,size=1M", str(fs)], check=True)
    with Journal.open(path) as j:
        assert j.records == kept
        j.append({"after": "space"})
    with Journal.open(path) as j:
        assert j.records == kept + [{"after": "space"}]


def test_simultaneous_starts_never_lose_or_replace_a_journal(tmp_path):
    """24 processes open one missing journal at once and each winner appends its pid. Before:
    a shared temp name (renamed away under the others: FileNotFoundError), a journal read
    while empty ("wrong magic"), or one created again over a journal a winner had written.
    Now each wins or is refused as locked, and every winner's record is in the journal."""
    path = str(tmp_path / "journal")
    r, w = os.pipe()
    kids = []
    for _ in range(24):
        pid = os.fork()
        if pid == 0:
            code = 9
            try:
                os.close(w)
                os.read(r, 1)  # EOF for all at once when the parent closes its end
                with Journal.open(path) as j:
                    j.append({"winner": os.getpid()})
                code = 0
            except JournalError as e:
                code = 7 if "in use by another engine" in str(e) else 8
            finally:
                os._exit(code)
        kids.append(pid)
    os.close(r)
    os.close(w)
    codes = {pid: os.waitpid(pid, 0)[1] >> 8 for pid in kids}
    assert set(codes.values()) <= {0, 7}, codes
    winners = sorted(pid for pid, c in codes.items() if c == 0)
    assert winners
    with Journal.open(path, create=False) as j:
        assert sorted(x["winner"] for x in j.records) == winners
    assert sorted(os.listdir(tmp_path)) == ["journal"]  # no temp file left behind


def test_a_state_directory_it_may_not_write_is_bad_input(tmp_path):
    """EACCES creating the journal is the operator's to fix, before anything was written:
    JournalError (exit 2), not a traceback nor an I/O failure. Run as an unprivileged user
    (root passes permission checks) in a child process."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    pid = os.fork()
    if pid == 0:
        code = 9
        try:
            os.setgid(65534)
            os.setuid(65534)
            Journal.open(str(closed / "journal"))
        except StateIOError:
            code = 8
        except JournalError as e:
            code = 7 if "cannot create: Permission denied" in str(e) else 6
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] >> 8 == 7
    assert os.listdir(closed) == []
