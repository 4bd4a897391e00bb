"""The tracker audit (RELIABILITY.md P6) and the source's identity (issue 11, items 3 and 5),
against real servers: nbdkit serving files, qemu-nbd with qcow2 dirty bitmaps.

A delta pass reads a sample of the blocks its change source calls unchanged and checks them
against the manifest before it begins: a tracker that missed writes makes it a compare pass
(the target ends right, the report says why), another disk of the same size where the source
was is refused when the state is bound with --source-id.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess

import pytest

from transfer.errors import TargetRefused
from transfer.demo.servers import Nbdkit, QemuNbd
from transfer.state.journal import Journal
from transfer.migration.warm import sync as api_sync
from transfer.tracking.audit import choose

from .conftest import compare, require
from .sync_test import (check_equal, qcow2_with_bitmap, raw_of, scribble, sync,
                        write_areas)

BLOCK = 64 * 1024
MiB = 1 << 20


def data_disk(path: str, size: int, seed: int) -> None:
    """Random bytes everywhere: two such disks differ in every block."""
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(size))


def blocks_of(areas: list[dict]) -> set[int]:
    return {b for a in areas for b in range(a["start"] // BLOCK,
                                            (a["start"] + a["length"] - 1) // BLOCK + 1)}


def write_behind(path: str, size: int, avoid: set[int], seed: int) -> int:
    """A write the tracker will not be told about, in a block outside avoid; its block."""
    r = random.Random(seed)
    block = r.choice([b for b in range(size // BLOCK) if b not in avoid])
    with open(path, "r+b") as f:
        f.seek(block * BLOCK + 1234)
        f.write(b"missed by the tracker")
    return block


def records(state) -> list[dict]:
    with Journal.open(str(state / "journal"), create=False) as j:
        return j.records


def begins(state) -> list[dict]:
    with Journal.open(str(state / "journal"), create=False) as j:
        return [x for x in j.records if x["t"] == "begin"]


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- the tracker audit


def test_an_areas_file_that_omits_a_write_becomes_a_compare_pass(nbdkit, tmp_path):
    """Through the CLI: the areas file names every write but one. 4 MiB is 64 blocks, so the
    default sample holds every unchanged block: the missed one is found, the pass is a compare
    pass, the report's fallback says how many of how many samples differed, and the target ends
    equal to the source. The begin record carries the audit."""
    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    data_disk(src, size, 1)
    server = nbdkit("file", src, readonly=True)
    sync(server.uri, dst, state, "--checkpoint", "c0")
    areas = scribble(src, 2, count=4)
    write_behind(src, size, blocks_of(areas), 3)
    told = write_areas(tmp_path / "a.json", size, areas)
    r = sync(server.uri, dst, state, "--changed-areas", told, "--checkpoint", "c1")
    unchanged = size // BLOCK - len(blocks_of(areas))
    assert r["change_source"] == "compare"
    assert f"the tracker audit found 1 of {unchanged} sampled blocks" in r["fallback"], r
    assert "compare pass" in r["fallback"]
    assert r["audit"]["sampled"] == unchanged and r["audit"]["mismatched"] == 1
    assert r["bytes_read"] == size  # a compare pass reads everything
    check_equal(src, dst, size, r)
    last = begins(state)[-1]
    assert last["compare"] and last["audit"] == r["audit"]
    # the next delta pass, with a truthful tracker, audits clean and stays a delta pass
    areas = scribble(src, 4, count=3)
    r = sync(server.uri, dst, state, "--changed-areas",
             write_areas(tmp_path / "b.json", size, areas), "--checkpoint", "c2", "--final")
    assert r["change_source"] == "changed areas" and r["fallback"] is None
    assert r["audit"]["mismatched"] == 0 and r["complete"]
    check_equal(src, dst, size, r)


def test_without_the_audit_the_same_lie_leaves_a_wrong_target(nbdkit, tmp_path):
    """--audit-blocks 0 disables the audit: the same missed write goes unnoticed (what the
    audit is for), the report has no audit, and only --final --verify=source finds it."""
    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    data_disk(src, size, 1)
    server = nbdkit("file", src, readonly=True)
    sync(server.uri, dst, state, "--checkpoint", "c0")
    areas = scribble(src, 2, count=4)
    missed = write_behind(src, size, blocks_of(areas), 3)
    told = write_areas(tmp_path / "a.json", size, areas)
    r = sync(server.uri, dst, state, "--changed-areas", told, "--checkpoint", "c1",
             "--audit-blocks", "0")
    assert r["change_source"] == "changed areas" and r["audit"] is None and r["fallback"] is None
    with open(src, "rb") as a, open(dst, "rb") as b:
        a.seek(missed * BLOCK)
        b.seek(missed * BLOCK)
        assert a.read(BLOCK) != b.read(BLOCK)
    assert "audit" not in begins(state)[-1]
    empty = write_areas(tmp_path / "e.json", size, [])
    out = sync(server.uri, dst, state, "--changed-areas", empty, "--final", "--verify=source",
               "--audit-blocks", "0", expect=6)["stderr"]
    assert "a change tracker missed writes" in out


def test_a_dirty_bitmap_with_a_write_behind_it(tmp_path):
    """qemu-nbd -B b1, where b1 was disabled before the last guest write: the bitmap misses it.
    The audit catches it, the pass becomes a compare pass, and the target equals the image."""
    require("qemu-nbd")
    require("qemu-io")
    size = 4 * MiB
    raw = str(tmp_path / "base.raw")
    data_disk(raw, size, 5)
    image, dst, state = str(tmp_path / "d.qcow2"), str(tmp_path / "dst.img"), tmp_path / "state"
    qcow2_with_bitmap(image, size, raw)
    sock = str(tmp_path / "q.sock")
    server = QemuNbd(sock, image).start()
    try:
        sync(server.uri, dst, state, "--checkpoint", "b0")
    finally:
        server.stop()
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 7 {5 * BLOCK} {2 * BLOCK}", image],
                   check=True, capture_output=True)  # recorded by b1
    subprocess.run(["qemu-img", "bitmap", "--disable", image, "b1"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 9 {40 * BLOCK + 512} 4096", image],
                   check=True, capture_output=True)  # behind b1's back
    server = QemuNbd(sock, image, options=["-B", "b1"]).start()
    try:
        r = sync(server.uri, dst, state, "--dirty-bitmap", "b1", "--checkpoint", "b1")
    finally:
        server.stop()
    assert r["change_source"] == "compare"
    assert "the tracker audit found 1 of 62 sampled blocks" in r["fallback"], r
    assert "dirty bitmap b1" in r["fallback"]
    assert r["bytes_copied"] == 3 * BLOCK  # the two it named and the one it missed
    check_equal(raw_of(image, str(tmp_path / "now.raw")), dst, size, r)


def test_another_disk_at_the_same_address_with_a_source_id_is_refused(tmp_path):
    """Through the CLI: the state is bound with --source-id; another disk of the same size is
    then served at the same socket, then at another. Most samples differ: refused with exit 2
    and one line, before the begin record (the journal has no new record) and with the target
    untouched."""
    size = 4 * MiB
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    dst, state, sock = str(tmp_path / "dst.img"), tmp_path / "state", str(tmp_path / "s.sock")
    data_disk(a, size, 6)
    data_disk(b, size, 7)
    server = Nbdkit(sock, "file", a, readonly=True).start()
    try:
        sync(server.uri, dst, state, "--checkpoint", "c0", "--source-id", "disk-6000c2")
    finally:
        server.stop()
    before, n = sha(dst), len(records(state))
    areas = write_areas(tmp_path / "x.json", size, [{"start": 0, "length": 4096}])
    for where in (sock, str(tmp_path / "elsewhere.sock")):
        server = Nbdkit(where, "file", b, readonly=True).start()
        try:
            out = sync(server.uri, dst, state, "--changed-areas", areas, "--checkpoint", "c1",
                       "--source-id", "disk-6000c2", expect=2)["stderr"]
        finally:
            server.stop()
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        assert "the tracker audit found 63 of 63 sampled blocks" in lines[0]
        assert "this is not the disk bound as source id 'disk-6000c2'" in lines[0]
        assert sha(dst) == before and len(records(state)) == n


def test_another_disk_at_the_same_address_without_a_source_id_is_compared(tmp_path):
    """Through the Python API: no --source-id, so a different disk of the same size at the
    same socket cannot be refused, but it cannot pass as a delta either: the compare pass makes
    the target equal to the disk now served, and says why."""
    size = 4 * MiB
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    dst, state, sock = str(tmp_path / "dst.img"), tmp_path / "state", str(tmp_path / "s.sock")
    data_disk(a, size, 6)
    data_disk(b, size, 7)
    server = Nbdkit(sock, "file", a, readonly=True).start()
    try:
        api_sync(server.uri, dst, state=str(state), checkpoint="c0")
    finally:
        server.stop()
    areas = write_areas(tmp_path / "x.json", size, [{"start": 0, "length": 4096}])
    server = Nbdkit(sock, "file", b, readonly=True).start()
    try:
        r = api_sync(server.uri, dst, state=str(state), changed_areas=areas, checkpoint="c1")
    finally:
        server.stop()
    assert r.change_source == "compare" and r.audit["mismatched"] == r.audit["sampled"] == 63
    assert "or this is another disk: compare pass" in r.fallback
    assert r.bytes_copied == size
    compare(b, dst, size=size)
    # the same through the Python API with an id, for a local source overwritten in place
    c, dst2, state2 = str(tmp_path / "c.img"), str(tmp_path / "dst2.img"), str(tmp_path / "s2")
    data_disk(c, size, 8)
    api_sync(c, dst2, state=state2, checkpoint="c0", source_id="disk-c")
    data_disk(c, size, 9)  # same path, same inode, other bytes
    before = sha(dst2)
    with pytest.raises(TargetRefused, match="63 of 63 .* not the disk bound as source id 'disk-c'"):
        api_sync(c, dst2, state=state2, changed_areas=areas, checkpoint="c1", source_id="disk-c")
    assert sha(dst2) == before


def test_the_sample_is_spread_evenly_and_at_random_over_unchanged_blocks():
    """choose(): only blocks inside the unchanged runs (the disk's short last block included),
    distinct, half spread evenly over the disk and the same whatever the delta, the rest
    differing from one draw to the next."""
    size = 1000 * BLOCK + 100
    unchanged = [(0, 10 * BLOCK), (50 * BLOCK, 900 * BLOCK), (990 * BLOCK, size)]
    inside = {o for s, e in unchanged for o in range(s, e, BLOCK)}
    blocks = size // BLOCK + 1

    def evens(inside: set[int]) -> set[int]:  # the first candidate from each even place on
        return {min((o for o in inside if o >= int((k + 0.5) * blocks / 32) * BLOCK),
                    default=max(inside)) for k in range(32)}

    picks = [choose(unchanged, size, 64, rng=random.Random(seed)) for seed in range(3)]
    for p in picks:
        assert len(p) == len(set(p)) == 64 and set(p) <= inside and p == sorted(p)
        assert evens(inside) <= set(p)  # the even half is the same every time...
    assert len(set(picks[0]) | set(picks[1])) > 64  # ...the random half is not
    spread = sorted(evens(inside))
    assert spread[-1] >= 980 * BLOCK  # to the end; and places in the changed run [10, 50)
    assert spread[0] == 50 * BLOCK and 78 * BLOCK in spread  # move to the next unchanged block
    # another delta moves none of the even blocks outside it: the same blocks pass after pass
    other = [(0, 300 * BLOCK), (301 * BLOCK, size)]
    places = {int((k + 0.5) * blocks / 32) * BLOCK for k in range(32)}
    kept = {o for o in spread if o in places and o != 300 * BLOCK}  # not moved, not in it
    assert len(kept) > 20 and kept <= set(choose(other, size, 64))
    assert choose(unchanged, size, 10_000) == sorted(inside)  # fewer candidates: all of them
    assert choose([], size, 64) == [] and choose(unchanged, size, 0) == []
    assert choose([(990 * BLOCK, size)], size, 64)[-1] == 1000 * BLOCK  # the short last block


def test_audit_blocks_is_validated(tmp_path):
    from .conftest import run_cli

    p = run_cli("sync", "x.img", str(tmp_path / "d.img"), "--state", str(tmp_path / "s"),
                "--audit-blocks", "-1")
    assert p.returncode == 2 and "--audit-blocks must be a whole number" in p.stderr
    p = run_cli("sync", "x.img", str(tmp_path / "d.img"), "--state", str(tmp_path / "s"),
                "--source-id", "bad\nid")
    assert p.returncode == 2 and "--source-id must be" in p.stderr


# -- the source's identity (item 5)


def test_another_source_id_is_refused(tmp_path):
    """Through the CLI: a state bound with --source-id takes that disk from any socket, and
    refuses another id, or none, with exit 2, one line, and the target untouched."""
    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    data_disk(src, size, 10)
    a = Nbdkit(str(tmp_path / "a.sock"), "file", src, readonly=True).start()
    try:
        sync(a.uri, dst, state, "--checkpoint", "c0", "--source-id", "vm-1/disk-0")
    finally:
        a.stop()
    before = sha(dst)
    areas = write_areas(tmp_path / "x.json", size, scribble(src, 11, count=2))
    b = Nbdkit(str(tmp_path / "b.sock"), "file", src, readonly=True).start()
    try:
        for args, says in ((("--source-id", "vm-1/disk-1"),
                            "this state belongs to source id 'vm-1/disk-0', not 'vm-1/disk-1'"),
                           ((), "this state is bound to source id 'vm-1/disk-0'; pass "
                                "--source-id vm-1/disk-0")):
            out = sync(b.uri, dst, state, "--changed-areas", areas, "--checkpoint", "c1", *args,
                       expect=2)["stderr"]
            assert len(out.strip().splitlines()) == 1 and says in out, out
            assert sha(dst) == before
        r = sync(b.uri, dst, state, "--changed-areas", areas, "--checkpoint", "c1",
                 "--source-id", "vm-1/disk-0")
    finally:
        b.stop()
    assert r["fallback"] is None and r["audit"]["mismatched"] == 0
    assert any("a.sock" in n and "b.sock" in n for n in r["notes"]), r["notes"]
    check_equal(src, dst, size, r)


def test_another_source_id_is_refused_by_the_api(tmp_path):
    size = 2 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), str(tmp_path / "s")
    data_disk(src, size, 12)
    api_sync(src, dst, state=state, source_id="A")
    before = sha(dst)
    with pytest.raises(TargetRefused, match="belongs to source id 'A', not 'B'"):
        api_sync(src, dst, state=state, compare=True, source_id="B")
    with pytest.raises(TargetRefused, match="bound to source id 'A'"):
        api_sync(src, dst, state=state, compare=True)
    assert sha(dst) == before
    r = api_sync(src, dst, state=state, compare=True, final=True, source_id="A")
    assert r.complete and not r.notes


def test_a_local_source_renamed_is_the_same_disk_a_copy_is_not(tmp_path):
    """A local file is bound by its device and inode: renamed (mv), it is the same disk, and
    the new path is recorded; a copy at another path is another file, refused unless the
    orchestrator names the disk (--source-id) or the operator says so (--source-moved)."""
    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    data_disk(src, size, 13)
    sync(src, dst, state, "--checkpoint", "c0")
    moved = str(tmp_path / "moved.img")
    os.rename(src, moved)
    areas = write_areas(tmp_path / "a.json", size, scribble(moved, 14, count=2))
    r = sync(moved, dst, state, "--changed-areas", areas, "--checkpoint", "c1")
    assert r["fallback"] is None and any("moved.img" in n for n in r["notes"]), r["notes"]
    check_equal(moved, dst, size, r)
    copy = str(tmp_path / "copy.img")
    shutil.copyfile(moved, copy)
    out = sync(copy, dst, state, "--compare", expect=2)["stderr"]
    assert "belongs to another source" in out and "inode" in out
    assert "--source-id or --source-moved" in out
    r = sync(copy, dst, state, "--compare", "--source-moved")
    assert any("accepted on --source-moved" in n for n in r["notes"])
    assert r["bytes_copied"] == 0  # the same bytes: the compare pass writes nothing
    check_equal(copy, dst, size, r)


def test_a_state_written_before_source_ids_still_loads(tmp_path):
    """Journal compatibility: bind records written before this change have no "export" (nor
    "id"); they are read as they are (the export name comes from the recorded uri), a new
    socket is accepted, and the state is rebound in the new form."""
    from transfer.state.journal import encode

    size = 2 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    data_disk(src, size, 15)
    a = Nbdkit(str(tmp_path / "a.sock"), "file", src, readonly=True).start()
    try:
        sync(a.uri, dst, state, "--checkpoint", "c0")
    finally:
        a.stop()
    with Journal.open(str(state / "journal"), create=False) as j:
        records = j.records
    for rec in records:
        if rec["t"] == "bind":
            assert rec["source"].pop("export") == ""  # as the engine before wrote it
    with open(state / "journal", "wb") as f:
        f.write(b"TRJOURN1" + b"".join(encode(i + 1, x) for i, x in enumerate(records)))
    b = Nbdkit(str(tmp_path / "b.sock"), "file", src, readonly=True).start()
    try:
        r = sync(b.uri, dst, state, "--compare", "--final")
    finally:
        b.stop()
    assert r["complete"] and r["bytes_copied"] == 0
    assert any("a.sock" in n and "b.sock" in n for n in r["notes"]), r["notes"]
    with Journal.open(str(state / "journal"), create=False) as j:
        last = [x for x in j.records if x["t"] == "bind"][-1]
    assert last["source"]["export"] == "" and last["version"] == 1


def test_another_export_name_is_another_disk(nbdkit, tmp_path):
    """Without --source-id, an NBD source is its export name (and size): the same socket
    serving another export is refused."""
    size = 2 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    data_disk(src, size, 16)
    server = nbdkit("file", src, readonly=True)
    uri = server.uri.replace("nbd+unix:///", "nbd+unix:///disk-a")
    sync(uri, dst, state, "--checkpoint", "c0")
    out = sync(uri.replace("disk-a", "disk-b"), dst, state, "--compare", expect=2)["stderr"]
    assert "belongs to another source" in out and "export 'disk-a' is now 'disk-b'" in out


def test_migrate_audits_every_pass_and_the_guest_races_stay_deltas(tmp_path):
    """`migrate` reads a node the guest still writes: a write after a hand-over lands in bitmap
    k+1, not k, so a live audit of pass k takes what differs only as a suspect, and pass k+1's
    bitmap must name it. Every pass is audited, the migration's deltas stay deltas (a suspect
    named by the next bitmap is no fallback) and the target is right."""
    import datetime
    import json

    from .migrate_test import Vm, check_target

    v = Vm(tmp_path, size=64 * MiB, seed=4, rate=8 * MiB, pattern="scattered")
    try:
        v.start_guest()
        target, state, report = str(tmp_path / "t.img"), tmp_path / "st", tmp_path / "r.json"
        when = (datetime.datetime.now() + datetime.timedelta(seconds=3)).isoformat()
        p = subprocess.run(v.migrate_argv(target, state, "--type", "warm", "--precopy-interval",
                                          "0.3s", "--cutover", when, "--report", str(report)),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        r = json.loads(report.read_text())
        passes = r["passes"]
        assert len(passes) >= 3 and passes[-1]["final"]
        assert all(0 < x["delta_bytes"] < v.size for x in passes[1:]), passes
        assert not any(x["fallback"] for x in passes), passes
        audits = [x.get("audit") for x in begins(state / "sync")]
        assert len(audits) == len(passes) and audits[0] is None  # pass 0 copies everything
        assert all(a["sampled"] > 0 for a in audits[1:]), audits
        assert audits[-1]["mismatched"] == 0 and "suspects" not in audits[-1]
        check_target(v, target, r)
    finally:
        v.close()


def test_migrate_catches_a_write_no_bitmap_recorded(tmp_path):
    """A write made behind qemu's back (into the image file under the daemon: no dirty bitmap
    records it) between two passes of a running migration. Without the audit the cutover
    would exit 0 with the old bytes there; the audit (every block sampled) finds it, the pass
    compares, and the target ends equal to the disk."""
    import asyncio

    from transfer.migration.migrate import migrate_async

    from .migrate_test import Vm, check_target

    v = Vm(tmp_path, size=8 * MiB, seed=5, rate=1 * MiB, pattern="hotspot")
    try:
        v.start_guest()
        target, state = str(tmp_path / "t.img"), tmp_path / "st"

        async def run() -> dict:
            passes = []

            def on_pass(info) -> None:
                passes.append(info)
                if len(passes) == 2:  # after pass 1: a write no tracker sees
                    with open(v.image, "r+b") as f:
                        f.seek(5 * MiB + 77)
                        f.write(b"behind the tracker's back")
                        f.flush()
                        os.fsync(f.fileno())
                if len(passes) == 3:
                    request_cutover(str(state))

            from transfer.migration.migrate import request_cutover

            r = await migrate_async(target, kind="warm", qmp=v.qmp, node="disk0",
                                    state=str(state), nbd_socket=v.nbd, precopy_interval=0.1,
                                    on_cutover=v.on_cutover, on_pass=on_pass,
                                    audit_blocks=1 << 20)
            return r.to_dict()

        r = asyncio.run(run())
        check_target(v, target, r)  # without the audit: the old bytes at 5 MiB, and exit 0
        found = [x for x in r["passes"] if "tracker audit" in (x["fallback"] or "")]
        assert found and found[0]["pass"] >= 2, r["passes"]
    finally:
        v.close()


def test_a_live_audit_waits_for_the_next_change_source(nbdkit, tmp_path):
    """sync's audit_live (what migrate's precopy passes use): a changed block the areas file
    omits is a suspect, not a fallback, in the pass that finds it; the next pass's areas file
    names it (the VM wrote it meanwhile) and it stays a delta pass; a pass whose areas file
    does not name a suspect compares."""
    size = 4 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), tmp_path / "state"
    data_disk(src, size, 31)
    uri = nbdkit("file", src, readonly=True).uri
    api_sync(uri, dst, state=str(state), checkpoint="c0")
    with open(src, "r+b") as f:  # written "after the hand-over": not in c1's areas
        f.seek(9 * BLOCK + 5)
        f.write(b"late")
    none = write_areas(tmp_path / "none.json", size, [])
    r = api_sync(uri, dst, state=str(state), changed_areas=none, checkpoint="c1",
                 audit_live=True)
    assert r.fallback is None and r.audit["mismatched"] == 1
    assert begins(state)[-1]["audit"]["suspects"] == [9 * BLOCK]
    named = write_areas(tmp_path / "named.json", size, [{"start": 9 * BLOCK, "length": 4}])
    r = api_sync(uri, dst, state=str(state), changed_areas=named, checkpoint="c2",
                 audit_live=True)
    assert r.fallback is None and r.change_source == "changed areas"
    compare(src, dst, size=size)
    # a live pass finds another change; the next source does not name it: compare
    with open(src, "r+b") as f:
        f.seek(40 * BLOCK)
        f.write(b"never named")
    r = api_sync(uri, dst, state=str(state), changed_areas=none, checkpoint="c3",
                 audit_live=True)
    assert r.fallback is None and begins(state)[-1]["audit"]["suspects"] == [40 * BLOCK]
    r = api_sync(uri, dst, state=str(state), changed_areas=none, checkpoint="c4", final=True)
    assert r.change_source == "compare" and "neither its change source" in r.fallback
    assert "offset 2621440" in r.fallback and r.complete
    compare(src, dst, size=size)


def test_a_block_device_source_is_audited_too(loop_device, tmp_path):
    """The sample is read through the local disk's own connection: a loop device whose
    changed-areas file omits a write is caught the same way."""
    size = 4 * MiB
    dev = loop_device(size, fill=random.Random(17).randbytes(BLOCK))
    dst, state = str(tmp_path / "dst.img"), tmp_path / "state"
    sync(dev, dst, state, "--checkpoint", "c0")
    told = [{"start": 3 * BLOCK + 10, "length": 100}]
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, b"told" * 25, 3 * BLOCK + 10)
        os.pwrite(fd, b"not told", 50 * BLOCK + 7)
        os.fsync(fd)
    finally:
        os.close(fd)
    r = sync(dev, dst, state, "--changed-areas", write_areas(tmp_path / "a.json", size, told),
             "--checkpoint", "c1")
    assert r["change_source"] == "compare" and r["audit"] == {**r["audit"], "sampled": 63,
                                                               "mismatched": 1}
    assert "1 of 63 sampled blocks" in r["fallback"] and r["bytes_copied"] == 2 * BLOCK
    compare(dev, dst, size=size)
