"""Warm migration passes (transfer sync) against real servers: qemu-nbd with qcow2 dirty
bitmaps, nbdkit with changed-areas files, and --compare; fail-closed cases and refusals.

Every multi-pass test ends with C1: qemu-img compare, an exact size check and the
digest recomputed independently of the engine.
"""

from __future__ import annotations

import json
import os
import queue
import random
import struct
import subprocess
import sys
import threading
import time

import pytest
import xxhash

from .conftest import compare, expected_digest_of_file, require, run_cli
from .oplog_test import _OP
from transfer.demo.servers import QemuNbd

BLOCK = 64 * 1024
MiB = 1 << 20


def sync(source: str, target: str, state, *args: str, tmp_path=None, expect: int = 0,
         **kw) -> dict:
    """Run `transfer sync` with a report; return the report (or {} when it failed as expected)."""
    report = os.path.join(str(state) + ".report.json")
    if os.path.exists(report):
        os.unlink(report)
    p = run_cli("sync", source, target, "--state", str(state), "--report", report,
                "--progress", "none", *args, **kw)
    assert p.returncode == expect, f"exit {p.returncode}: {p.stderr}"
    if expect != 0:
        assert "Traceback" not in p.stderr, p.stderr
        return {"stderr": p.stderr}
    with open(report) as f:
        return json.load(f)


def journal_records(state) -> list[dict]:
    """The journal's whole records, parsed read-only from the file (format: the docstring of
    transfer/state/journal.py). Journal.open would take the lock a running engine holds (and
    could truncate a tail being appended), so this never locks nor writes: a running engine is
    not disturbed. A record not yet whole (still being appended, or torn by a kill) ends the
    list; the next engine to open the journal drops it."""
    try:
        with open(os.path.join(str(state), "journal"), "rb") as f:
            data = f.read()
    except FileNotFoundError:  # not created yet (it appears whole, by a link)
        return []
    assert data[:8] == b"TRJOURN1", data[:8]
    records, pos = [], 8
    while pos + 12 <= len(data):
        length, seq = struct.unpack_from("<IQ", data, pos)
        end = pos + 12 + length + 8
        if end > len(data) or xxhash.xxh3_64_intdigest(data[pos:end - 8]) != \
                struct.unpack_from("<Q", data, end - 8)[0]:
            break
        assert seq == len(records) + 1, (seq, len(records))
        records.append(json.loads(data[pos + 12:end - 8]))
        pos = end
    return records


class SyncChild:
    """`transfer sync ... --progress json` as a child process: its JSON progress lines (stdout)
    and stderr are read on threads as they come, so the test can wait for one."""

    def __init__(self, source: str, target: str, state, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "transfer.cli", "sync", source, target, "--state", str(state),
             "--progress", "json", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: queue.Queue = queue.Queue()
        self._err: list[str] = []
        self._threads = [threading.Thread(target=self._lines, daemon=True),
                         threading.Thread(target=lambda: self._err.append(self.proc.stderr.read()),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _lines(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:  # wait_progress fails on it, showing the line
                self.events.put({"event": "not JSON", "line": line})
        self.events.put(None)  # stdout closed: the engine ended

    def wait_progress(self, what: str, check, timeout: float = 120.0) -> dict:
        """The first progress event for which check(event) is true; fail if the engine ends
        (or reports its final event) before one comes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                e = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no progress line with {what} within {timeout} s")
            if e is None:
                pytest.fail(f"the engine ended (exit {self.proc.wait()}) before a progress line "
                            f"with {what}: {''.join(self._err)}")
            assert e["event"] == "progress", e
            if check(e):
                return e
            assert not e["final"], f"the pass ended before a progress line with {what}: {e}"

    def finish(self, timeout: float = 120.0) -> tuple[int, str]:
        """(exit code, stderr) once the child has ended."""
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc, "".join(self._err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by its pid


def make_disk(path: str, size: int, seed: int) -> None:
    """Random data in most 256 KiB chunks, holes in the rest."""
    r = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 256 << 10):
            if r.random() < 0.6:
                f.seek(off)
                f.write(r.randbytes(256 << 10))


def scribble(path: str, seed: int, *, count: int = 24) -> list[dict]:
    """Write random data at random places (some unaligned, some spanning blocks) and zero
    some others; return the areas written as DiskChangeInfo changedArea entries."""
    r = random.Random(seed)
    size = os.path.getsize(path)
    areas = []
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(count):
            length = r.choice([512, 4096, BLOCK, 3 * BLOCK + 777, MiB])
            start = r.randrange(0, size - length)
            data = bytes(length) if i % 5 == 0 else r.randbytes(length)
            os.pwrite(fd, data, start)
            areas.append({"start": start, "length": length})
        os.fsync(fd)
    finally:
        os.close(fd)
    r.shuffle(areas)  # the engine sorts them
    return areas


def write_areas(path, size: int, areas: list[dict]) -> str:
    with open(path, "w") as f:
        json.dump({"startOffset": 0, "length": size, "changedArea": areas}, f)
    return str(path)


def check_equal(source_file: str, target_file: str, size: int, report: dict) -> None:
    compare(source_file, target_file, size=size)
    assert expected_digest_of_file(target_file) == report["digest"]


def test_three_passes_with_changed_areas(nbdkit, tmp_path):
    size = 48 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 1)
    server = nbdkit("file", src, readonly=True)
    r = sync(server.uri, dst, state, "--checkpoint", "c0")
    assert (r["pass"], r["change_source"], r["delta_bytes"]) == (0, "full (first pass)", size)
    check_equal(src, dst, size, r)
    for k in (1, 2, 3):
        areas = scribble(src, 10 + k)
        changed = write_areas(tmp_path / f"a{k}.json", size, areas)
        final = ["--final", "--verify=source"] if k == 3 else []
        r = sync(server.uri, dst, state, "--changed-areas", changed, "--checkpoint", f"c{k}",
                 *final)
        assert r["pass"] == k and r["change_source"] == "changed areas" and r["fallback"] is None
        # only the named areas, rounded outward to blocks, were planned
        blocks = {b for a in areas for b in range(a["start"] // BLOCK,
                                                   (a["start"] + a["length"] - 1) // BLOCK + 1)}
        assert r["delta_bytes"] == len(blocks) * BLOCK
        assert r["bytes_copied"] + r["bytes_zeroed"] + r["bytes_skipped"] == r["delta_bytes"]
        check_equal(src, dst, size, r)
    assert r["complete"] and r["verified"]
    again = sync(server.uri, dst, state, "--compare", expect=2)
    assert "complete" in again["stderr"]


def qcow2_with_bitmap(path: str, size: int, raw: str) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", path, "b1"], check=True)


def qemu_io_writes(image: str, seed: int, size: int) -> set[int]:
    """Guest writes between passes: data (some unaligned) and a zeroed, unmapped range.
    Returns the 64 KiB blocks touched."""
    r = random.Random(seed)
    cmds, blocks = [], set()
    for i in range(13):
        if i == 12:
            off, length = r.randrange(0, size - 2 * MiB, BLOCK), 2 * MiB
            cmds += ["-c", f"write -z -u {off} {length}"]  # zeroes, unmapped: a hole now
        else:
            off, length = r.randrange(0, size - MiB, 512), r.choice([512, 4096, BLOCK, MiB])
            cmds += ["-c", f"write -P {r.randrange(1, 255)} {off} {length}"]
        blocks.update(range(off // BLOCK, (off + length - 1) // BLOCK + 1))
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, image], check=True, capture_output=True)
    return blocks


def raw_of(image: str, out: str) -> str:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, out], check=True)
    return out


def test_three_passes_with_qemu_dirty_bitmaps(tmp_path):
    """The hand-over of R1, offline: before pass k reads, bitmap b(k+1) is added and b(k)
    disabled; pass k copies what b(k) recorded. A zeroed range must become zero on the target."""
    require("qemu-nbd")
    require("qemu-io")
    size = 32 * MiB
    raw = str(tmp_path / "base.raw")
    make_disk(raw, size, 2)
    image, dst, state = str(tmp_path / "d.qcow2"), str(tmp_path / "dst.img"), tmp_path / "state"
    qcow2_with_bitmap(image, size, raw)
    sock = str(tmp_path / "qemu-nbd.sock")  # one address for every pass: the state binds it

    def run_pass(k: int, *args: str) -> dict:
        opts = ["-B", f"b{k}"] if k > 0 else []
        server = QemuNbd(sock, image, options=opts).start()
        try:
            return sync(server.uri, dst, state, *args)
        finally:
            server.stop()

    r = run_pass(0, "--checkpoint", "b0")
    assert r["pass"] == 0
    for k in (1, 2, 3):
        touched = qemu_io_writes(image, 20 + k, size)
        subprocess.run(["qemu-img", "bitmap", "--add", image, f"b{k + 1}"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--disable", image, f"b{k}"], check=True)
        final = ["--final", "--verify=source"] if k == 3 else []
        r = run_pass(k, "--dirty-bitmap", f"b{k}", "--checkpoint", f"b{k}", *final)
        assert r["change_source"] == f"dirty bitmap b{k}" and r["fallback"] is None, r
        assert r["delta_bytes"] == len(touched) * BLOCK  # the bitmap's granularity is 64 KiB
        assert r["bytes_zeroed"] > 0  # the discarded range, from base:allocation
        check_equal(raw_of(image, str(tmp_path / f"now{k}.raw")), dst, size, r)
    assert r["complete"]


def test_missing_bitmap_falls_back_to_compare(tmp_path):
    """R2: the server does not offer the bitmap: a compare pass, said in words, never 'no
    changes'."""
    require("qemu-nbd")
    require("qemu-io")
    size = 16 * MiB
    raw = str(tmp_path / "base.raw")
    make_disk(raw, size, 3)
    image, dst, state = str(tmp_path / "d.qcow2"), str(tmp_path / "dst.img"), tmp_path / "state"
    qcow2_with_bitmap(image, size, raw)
    sock = str(tmp_path / "q.sock")
    server = QemuNbd(sock, image).start()
    try:
        sync(server.uri, dst, state)
    finally:
        server.stop()
    qemu_io_writes(image, 5, size)
    server = QemuNbd(sock, image).start()  # no -B: the context is not offered
    try:
        r = sync(server.uri, dst, state, "--dirty-bitmap", "b1")
    finally:
        server.stop()
    assert r["change_source"] == "compare"
    assert "does not offer the dirty bitmap 'b1'" in r["fallback"]
    assert r["bytes_copied"] > 0
    check_equal(raw_of(image, str(tmp_path / "now.raw")), dst, size, r)


def test_compare_writes_only_changed_blocks(nbdkit, tmp_path):
    """--compare reads everything and writes only blocks whose digest changed: counted by
    the report and by nbdkit's log of the target's writes."""
    size = 16 * MiB
    src, state = str(tmp_path / "src.img"), tmp_path / "state"
    make_disk(src, size, 4)
    tgt_file, log = str(tmp_path / "tgt.img"), str(tmp_path / "tgt.log")
    with open(tgt_file, "wb") as f:
        f.truncate(size)
    source = nbdkit("file", src, readonly=True)
    target = nbdkit("file", tgt_file, f"logfile={log}", filters=("log",))
    sync(source.uri, target.uri, state)
    fd = os.open(src, os.O_RDWR)
    changed = [3, 17, 18, 200]  # blocks; 17-18 a run
    for b in changed:
        os.pwrite(fd, b"\xa5" * 100, b * BLOCK + 1000)
    os.close(fd)
    with open(log) as f:
        before = len(f.readlines())
    r = sync(source.uri, target.uri, state, "--compare")
    assert r["change_source"] == "compare"
    assert r["bytes_copied"] == len(changed) * BLOCK
    assert r["bytes_read"] > 0 and r["bytes_unchanged"] == size - len(changed) * BLOCK
    with open(log) as f:
        lines = f.readlines()[before:]
    written = [(int(m.group(2), 16), int(m.group(3), 16)) for line in lines
               if (m := _OP.search(line)) and m.group(1) in ("Write", "Zero", "Trim")]
    assert sorted(written) == [(3 * BLOCK, BLOCK), (17 * BLOCK, 2 * BLOCK), (200 * BLOCK, BLOCK)]
    check_equal(src, tgt_file, size, r)


def test_same_checkpoint_twice_is_harmless(nbdkit, tmp_path):
    """R4: a pass of a committed checkpoint copies nothing, and the target stays right."""
    size = 8 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 5)
    server = nbdkit("file", src, readonly=True)
    sync(server.uri, dst, state, "--checkpoint", "c0")
    areas = write_areas(tmp_path / "a.json", size, scribble(src, 6, count=4))
    first = sync(server.uri, dst, state, "--changed-areas", areas, "--checkpoint", "c1")
    second = sync(server.uri, dst, state, "--changed-areas", areas, "--checkpoint", "c1")
    assert first["bytes_copied"] > 0 and first["pass"] == 1
    assert second["pass"] == 1 and second["bytes_copied"] == 0 and second["delta_bytes"] == 0
    assert "was committed by pass 1" in second["change_source"]
    check_equal(src, dst, size, second)


def test_a_reused_checkpoint_copies_what_its_source_names_beyond_the_commit(nbdkit, tmp_path):
    """A checkpoint committed already, asked again with an areas file that names more: the
    checkpoint's blocks are copied again with the extra ones (never silently skipped); the same
    file once more copies nothing."""
    size = 8 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 12)
    sync(src, dst, state, "--checkpoint", "c0")
    first = scribble(src, 13, count=3)
    areas = write_areas(tmp_path / "a.json", size, first)
    first_pass = sync(src, dst, state, "--changed-areas", areas, "--checkpoint", "c1")
    used = {b for x in first for b in range(x["start"] // BLOCK,
                                            (x["start"] + x["length"] - 1) // BLOCK + 1)}
    free = next(b for b in range(size // BLOCK) if b not in used)
    more = [{"start": free * BLOCK + 5, "length": 10}]
    with open(src, "r+b") as f:
        f.seek(free * BLOCK + 5)
        f.write(b"0123456789")
    write_areas(tmp_path / "a.json", size, first + more)
    r = sync(src, dst, state, "--changed-areas", areas, "--checkpoint", "c1")
    assert r["change_source"].startswith("changed areas beyond what checkpoint c1 was committed")
    assert r["delta_bytes"] == first_pass["delta_bytes"] + BLOCK  # the checkpoint's, again
    check_equal(src, dst, size, r)
    r = sync(src, dst, state, "--changed-areas", areas, "--checkpoint", "c1")
    assert r["delta_bytes"] == 0 and r["change_source"].startswith("none")


def test_a_new_socket_for_each_pass_needs_no_flag(tmp_path):
    """Item 5: an orchestrator serves each stage from a new socket (a new importer pod). The
    state is bound to the disk (export name and size), not its address: pass 0, a delta and
    the final pass from three sockets, no extra flag, and the target is right. Each new address
    is recorded, redacted, in a bind record and said in the report's notes."""
    from transfer.demo.servers import Nbdkit
    from transfer.state.journal import Journal

    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 14)
    reports = []
    for k, name in enumerate(("a", "b", "c")):
        server = Nbdkit(str(tmp_path / f"{name}.sock"), "file", src, readonly=True).start()
        try:
            if k == 0:
                reports.append(sync(server.uri, dst, state, "--checkpoint", "c0"))
                continue
            areas = write_areas(tmp_path / f"a{k}.json", size, scribble(src, 30 + k, count=3))
            final = ["--final", "--verify=source"] if k == 2 else []
            reports.append(sync(server.uri, dst, state, "--changed-areas", areas,
                                "--checkpoint", f"c{k}", *final))
        finally:
            server.stop()
        r = reports[-1]
        assert r["change_source"] == "changed areas" and r["fallback"] is None, r
        assert r["notes"] and f"{'abc'[k - 1]}.sock" in r["notes"][0] and f"{name}.sock" in \
            r["notes"][0], r["notes"]
        assert r["audit"]["sampled"] > 0 and r["audit"]["mismatched"] == 0
        check_equal(src, dst, size, r)
    assert reports[-1]["complete"]
    with Journal.open(str(state / "journal"), create=False) as j:
        binds = [x["source"] for x in j.records if x["t"] == "bind"]
    assert [b["uri"].split("/")[-1] for b in binds] == ["a.sock", "b.sock", "c.sock"]
    assert all(b["export"] == "" and "id" not in b for b in binds)


def test_a_moved_source_resumes_an_interrupted_pass(tmp_path):
    """A pass interrupted, then its source served elsewhere: the rebind lands mid-pass, and the
    journal stays readable; the pass resumes from its commit. SIGTERM is sent once a progress
    line shows the pass under way (the signal handlers are installed before it starts)."""
    import signal

    from transfer.demo.servers import Nbdkit

    size = 24 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 15)
    a = Nbdkit(str(tmp_path / "a.sock"), "file", src, "rate=32M", readonly=True,
               filters=("rate",)).start()
    try:
        child = SyncChild(a.uri, dst, state)
        try:
            child.wait_progress("bytes done mid-pass", lambda e: 0 < e["bytes_done"] < size)
            child.proc.send_signal(signal.SIGTERM)
            rc, err = child.finish(timeout=30)
        finally:
            child.kill()
        assert rc == 5, err
        records = journal_records(state)
        assert [x["t"] for x in records].count("begin") == 1 and records[-1]["t"] == "commit"
        assert 0 < records[-1]["upto"] < size  # SIGTERM committed what finished, mid-pass
    finally:
        a.stop()
    b = Nbdkit(str(tmp_path / "b.sock"), "file", src, readonly=True).start()
    try:
        r = sync(b.uri, dst, state, "--source-moved")
        assert r["resumed"] and r["notes"] and r["delta_bytes"] < size
        check_equal(src, dst, size, r)
        r = sync(b.uri, dst, state, "--compare", "--final")  # the journal reads back whole
        assert r["complete"] and r["bytes_copied"] == 0
    finally:
        b.stop()


def test_source_size_change_is_a_full_pass(tmp_path):
    size = 8 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 7)
    with open(dst, "wb") as f:
        f.truncate(2 * size)
    sync(src, dst, state)
    with open(src, "r+b") as f:
        f.truncate(size + MiB)
        f.seek(size)
        f.write(b"\x5a" * MiB)
    areas = write_areas(tmp_path / "a.json", size, [{"start": 0, "length": 4096}])
    r = sync(src, dst, state, "--changed-areas", areas)
    assert r["change_source"] == "full" and "size changed" in r["fallback"]
    assert r["delta_bytes"] == size + MiB
    with open(dst, "rb") as f:
        assert f.read(size + MiB) == open(src, "rb").read()


def test_refusals(nbdkit, tmp_path):
    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 8)
    sync(src, dst, state)
    other = str(tmp_path / "other.img")
    with open(other, "wb") as f:
        f.truncate(size)
    out = sync(src, other, state, expect=2)["stderr"]
    assert "belongs to another target" in out and "inode" in out
    src2 = str(tmp_path / "src2.img")
    make_disk(src2, size, 9)
    assert "belongs to another source" in sync(src2, dst, state, expect=2)["stderr"]
    # a second engine on the same state: the journal is locked
    from transfer.state.journal import Journal

    with Journal.open(str(state / "journal")):
        assert "in use by another engine" in sync(src, dst, state, expect=2)["stderr"]
    # a second engine on the same target file, through another state directory
    import fcntl

    with open(dst, "r+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        out = sync(src, dst, tmp_path / "state2", "--force", expect=2)["stderr"]
        assert "in use by another transfer" in out
    p = run_cli("sync", src, dst, "--state", str(state), "--compare", "--changed-areas", "x")
    assert p.returncode == 2 and "not allowed with" in p.stderr
    p = run_cli("sync", src, dst, "--state", str(state), "--verify=source")
    assert p.returncode == 2 and "--final" in p.stderr
    p = run_cli("sync", src, "null:", "--state", str(tmp_path / "s3"))
    assert p.returncode == 2 and "null:" in p.stderr


def test_bad_changed_areas_is_an_error_not_a_pass(tmp_path):
    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 10)
    sync(src, dst, state)
    bad = write_areas(tmp_path / "bad.json", size, [{"start": size - 10, "length": 20}])
    out = sync(src, dst, state, "--changed-areas", bad, expect=2)["stderr"]
    assert "outside the covered range" in out


def test_secrets_never_reach_state_report_or_output(nbdkit, tmp_path):
    """X5: a password in the source URI appears nowhere: not in the journal, the manifest, the
    ranges files, the report, the progress lines or the messages."""
    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 11)
    server = nbdkit("file", src, readonly=True)
    uri = server.uri.replace("nbd+unix://", "nbd+unix://admin:CANARY1@")
    outputs = []
    for args in ((), ("--changed-areas", write_areas(tmp_path / "a.json", size,
                                                      [{"start": 0, "length": 1}])),
                 ("--final",)):
        p = run_cli("sync", uri, dst, "--state", str(state), "--report", str(tmp_path / "r.json"),
                    "--progress", "json", *args)
        assert p.returncode == 0, p.stderr
        outputs.append(p.stdout + p.stderr)
        with open(tmp_path / "r.json") as f:
            outputs.append(f.read())
    assert "admin:***@" in outputs[1]  # the user stays, the password does not
    for name in os.listdir(state):
        with open(state / name, "rb") as f:
            outputs.append(f.read().decode("latin-1"))
    assert not [o for o in outputs if "CANARY" in o]


def test_a_failed_read_back_is_repaired_by_a_compare_pass(tmp_path):
    """--final reads the target back; a block that differs from the manifest (the target lost
    a write) fails the pass with exit 6, and the next --compare pass rewrites that block."""
    size = 8 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 16)
    sync(src, dst, state, "--checkpoint", "c0")
    with open(src, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(BLOCK) != bytes(BLOCK)  # a data block (make_disk is deterministic)
    with open(dst, "r+b") as f:  # the target loses it
        f.seek(3 * MiB + 100)
        f.write(b"lost write")
    out = sync(src, dst, state, "--compare", "--final", expect=6)["stderr"]
    assert "read back from the target differ" in out and str(3 * MiB) in out
    r = sync(src, dst, state, "--compare", "--final")
    assert r["complete"] and r["bytes_copied"] == BLOCK
    check_equal(src, dst, size, r)


def test_a_size_change_survives_a_kill_before_its_pass_began(tmp_path):
    """The source grew; the run that noticed it bound the new size and died before its pass
    began. The next run must still make a full pass (R2), not a delta over an empty manifest."""
    from transfer.state.journal import Journal, encode

    size = 8 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    make_disk(src, size, 17)
    sync(src, dst, state, "--checkpoint", "c0")
    with open(src, "r+b") as f:
        f.seek(size)
        f.write(b"\x42" * MiB)
    with open(dst, "r+b") as f:  # the target grows with it (a PVC resized): still the target
        f.truncate(size + MiB)
    r = sync(src, dst, state, "--checkpoint", "c1")
    assert r["change_source"] == "full" and "size changed" in r["fallback"]
    with Journal.open(str(state / "journal"), create=False) as j:  # as if killed after the bind
        records = j.records
    cut = max(i for i, x in enumerate(records) if x["t"] == "bind") + 1
    with open(state / "journal", "wb") as f:
        f.write(b"TRJOURN1" + b"".join(encode(i + 1, x) for i, x in enumerate(records[:cut])))
    with open(src, "r+b") as f:
        f.seek(size + 5)
        f.write(b"changed after the bind")
    areas = write_areas(tmp_path / "a.json", size + MiB, [{"start": 0, "length": 1}])
    r = sync(src, dst, state, "--changed-areas", areas, "--checkpoint", "c1")
    assert r["change_source"] == "full" and "size changed from" in r["fallback"], r
    r = sync(src, dst, state, "--compare", "--final")
    check_equal(src, dst, size + MiB, r)
