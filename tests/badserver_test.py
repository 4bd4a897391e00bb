"""Block status replies from a server that lies (RELIABILITY.md S7, S8): clipped, rejected, or
read as data; never taken as "zero" without a reason."""

from __future__ import annotations

import os

import pytest

import transfer
from transfer.errors import SourceError

from .badserver import BadServer
from .conftest import expected_digest_of_file

MiB = 1 << 20


@pytest.fixture
def data(tmp_path):
    raw = os.urandom(MiB) + bytes(MiB) + os.urandom(MiB)
    path = tmp_path / "expected.raw"
    path.write_bytes(raw)
    return raw, str(path)


def serve(tmp_path, raw, block_status):
    return BadServer(str(tmp_path / "bad.sock"), raw, block_status)


def test_an_extent_past_the_end_is_clipped(tmp_path, data):
    raw, path = data
    with serve(tmp_path, raw, lambda off, n: [(0xFFFFF000, 0)]) as s:  # ~4 GiB on 3 MiB
        r = transfer.copy(s.uri, str(tmp_path / "t.img"))
    assert r.digest == expected_digest_of_file(path) and r.bytes_read == 3 * MiB


def test_a_zero_length_extent_is_rejected(tmp_path, data):
    raw, _ = data
    with serve(tmp_path, raw, lambda off, n: [(0, 0), (n, 0)]) as s:
        with pytest.raises(SourceError, match="extent of length 0"):
            transfer.copy(s.uri, str(tmp_path / "t.img"))


def test_no_answer_for_the_context_means_read_everything(tmp_path, data):
    """S7: libnbd returns success without calling back; that must not mean 'all zero'."""
    raw, path = data
    with serve(tmp_path, raw, lambda off, n: None) as s:
        r = transfer.copy(s.uri, str(tmp_path / "t.img"))
    assert r.digest == expected_digest_of_file(path) and r.bytes_read == 3 * MiB


def test_short_replies_are_asked_again(tmp_path, data):
    raw, path = data
    # 4 KiB at a time, alternating data and hole+zero flags over the zero MiB only
    def status(off, n):
        return [(4096, 3 if MiB <= off < 2 * MiB else 0)]

    with serve(tmp_path, raw, status) as s:
        r = transfer.copy(s.uri, str(tmp_path / "t.img"))
    assert r.digest == expected_digest_of_file(path)
    assert r.bytes_read == 2 * MiB  # the zero MiB, reported as holes 4 KiB at a time, not read


def test_block_status_errors_mean_read_everything(nbdkit, tmp_path, data):
    """S6: nbdkit's error filter fails every block status request; the copy reads it all."""
    raw, _ = data
    path = str(tmp_path / "sparse.img")
    with open(path, "wb") as f:  # the zero MiB as a hole this time
        f.write(raw[:MiB])
        f.seek(2 * MiB)
        f.write(raw[2 * MiB :])
    honest = nbdkit("file", path, readonly=True)
    assert transfer.copy(honest.uri, str(tmp_path / "a.img")).bytes_read == 2 * MiB
    src = nbdkit("file", path, "error-extents=EIO", "error-extents-rate=100%", readonly=True,
                 filters=["error"])
    r = transfer.copy(src.uri, str(tmp_path / "t.img"))
    assert r.digest == expected_digest_of_file(path)
    assert r.bytes_read == 3 * MiB  # the hole is read too: nothing is zero unless the server says


def _half(off: int, n: int) -> list[tuple[int, int]]:
    """S11: one OFFSET_DATA chunk for the first half of the request, flagged DONE."""
    return [(off, max(1, n // 2))]


def test_a_short_read_is_never_taken_as_data(tmp_path, data):
    """S11: libnbd 1.14 passes such a read to the completion callback with error 0; the engine
    must still fail it (retried, then a source error naming the offset), never hash or write it."""
    raw, _ = data
    target = tmp_path / "t.img"
    with BadServer(str(tmp_path / "bad.sock"), raw, lambda off, n: [(n, 0)], reads=_half) as s:
        with pytest.raises(SourceError, match="offset 0") as e:
            transfer.copy(s.uri, str(target), retries=1)
        with pytest.raises(SourceError):
            transfer.checksum(s.uri, retries=0)
    assert e.value.exit_code == 3
    assert not target.exists() or target.read_bytes() == bytes(target.stat().st_size)


def test_a_short_read_fails_every_command_through_the_cli(tmp_path, data):
    """S11 through the CLI: copy, copy --verify, sync, checksum and verify each exit 3 naming
    the offset, where the engine used to print a digest of the wrong bytes."""
    from .conftest import run_cli

    raw, path = data
    # only the request at 1 MiB + 2 MiB (the last MiB) comes back short: the rest is honest
    bad = 2 * MiB

    def reads(off: int, n: int) -> list[tuple[int, int]]:
        return _half(off, n) if off <= bad < off + n else [(off, n)]

    with BadServer(str(tmp_path / "bad.sock"), raw, lambda off, n: [(n, 0)], reads=reads) as s:
        runs = {
            "copy": run_cli("copy", s.uri, str(tmp_path / "a.img"), "--retries", "1",
                            "--progress", "none"),
            "copy --verify": run_cli("copy", s.uri, str(tmp_path / "b.img"), "--retries", "1",
                                     "--verify", "--progress", "none"),
            "sync": run_cli("sync", s.uri, str(tmp_path / "c.img"), "--state",
                            str(tmp_path / "state"), "--retries", "1", "--progress", "none"),
            "checksum": run_cli("checksum", s.uri, "--retries", "1", "--progress", "none"),
            "verify": run_cli("verify", s.uri, path, "--retries", "1", "--progress", "none"),
        }
    for what, p in runs.items():
        assert p.returncode == 3, (what, p.returncode, p.stdout, p.stderr)
        assert "offset 2097152" in p.stderr, (what, p.stderr)
        assert "Traceback" not in p.stderr and "xxh3-128:" not in p.stdout, (what, p.stdout)


def _alternating(count: int) -> bytes:
    """A block status body of count 1-byte descriptors, data and hole+zero in turn."""
    import struct

    return (struct.pack(">II", 1, 0) + struct.pack(">II", 1, 3)) * (count // 2)


def test_both_block_status_kernels_read_replies_alike(tmp_path, data):
    """The compiled kernel against its twin (the binding's list), on real replies: merged,
    clipped, cut at the cap with the rest unknown, odd, zero-length, absent."""
    import nbd

    from transfer import _native

    raw, _ = data
    replies = {
        "plain": [(MiB, 0), (MiB, 3), (4 * MiB, 0)],  # the last runs past the 3 MiB end
        "merge": [(4096, 0)] * 10 + [(4096, 3)] * 5 + [(3 * MiB, 0)],
        "cut": [(1, 0), (1, 3)] * 600 + [(3 * MiB, 0)],
        "zero": [(4096, 0), (0, 0), (4096, 0)],
        "none": None,
    }
    current = {}
    with serve(tmp_path, raw, lambda off, n: current["reply"]) as s:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(s.uri)
        try:
            for name, reply in replies.items():
                current["reply"] = reply
                got = [k.block_status(h, "base:allocation", 0, 3 * MiB, 1000)
                       for k in (_native.kernels("cython"), _native.kernels("python"))]
                assert got[0] == got[1], name
                if name == "cut":
                    status, extents, pos, truncated = got[0]
                    assert truncated and len(extents) == 1000 and pos == 1000
                if name == "merge":
                    assert got[0][1][:2] == [(0, 40960, 0), (40960, 20480, 3)]
        finally:
            h.shutdown()


def test_eight_million_extents_in_one_reply_cost_little_memory(tmp_path, data):
    """S8: 8,000,000 descriptors for a 3 MiB disk (a 64 MB reply, which libnbd accepts). The
    binding would build one Python list of 16,000,000 numbers (343-590 MiB); the copy through
    the CLI stays under 256 MiB peak RSS and is exact: what the cap leaves unknown is read."""
    import subprocess
    import sys

    raw, path = data
    body = _alternating(8_000_000)

    class Flood(BadServer):
        def _chunk(self, conn, handle, kind, payload, done=True):
            if kind == 5:  # REPLY_BLOCK_STATUS: the context id, then the flood
                payload = payload[:4] + body
            super()._chunk(conn, handle, kind, payload, done)

    target = tmp_path / "t.img"
    with Flood(str(tmp_path / "bad.sock"), raw, lambda off, n: [(n, 0)]) as s:
        # GNU time reports the copy's own peak RSS (a child forked from this large test process
        # would be charged for this process's pages too)
        p = subprocess.run(["/usr/bin/time", "-f", "peak-kib %M", sys.executable, "-m",
                            "transfer.cli", "copy", s.uri, str(target), "--progress", "none"],
                           capture_output=True, text=True, timeout=120)
    *err, peak = p.stderr.strip().splitlines()
    assert p.returncode == 0, p.stderr
    assert not err, err  # nothing printed: no traceback, no warning
    peak_kib = int(peak.removeprefix("peak-kib "))
    assert peak_kib < 256 * 1024, f"peak RSS {peak_kib >> 10} MiB"
    assert expected_digest_of_file(str(target)) == expected_digest_of_file(path)


def test_a_hole_without_the_zero_flag_is_read_as_data(tmp_path, data):
    """A HOLE extent without ZERO (a backing file shows through, as qemu says of a qcow2 over a
    backing chain) must be read: nbdkit always sends HOLE|ZERO, so only this server tries it.
    The middle MiB is random data flagged HOLE: taken as zero, the copy would be wrong."""
    raw = os.urandom(3 * MiB)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(raw)

    def status(off, n):
        return [(MiB - off % MiB, 1 if MiB <= off < 2 * MiB else 0)]

    target = tmp_path / "t.img"
    with serve(tmp_path, raw, status) as s:
        r = transfer.copy(s.uri, str(target))
        assert r.bytes_read == 3 * MiB
        assert transfer.checksum(s.uri).digest == expected_digest_of_file(str(expected))
    assert target.read_bytes() == raw


def test_a_hole_without_the_zero_flag_is_read_through_the_cli(tmp_path, data):
    """The same, as a user runs it: copy --verify and verify SOURCE TARGET both see the data."""
    from .conftest import run_cli

    raw = os.urandom(3 * MiB)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(raw)
    target = tmp_path / "t.img"
    with serve(tmp_path, raw, lambda off, n: [(n, 1)]) as s:  # all of it HOLE, never ZERO
        p = run_cli("copy", s.uri, str(target), "--verify", "--progress", "none")
        assert p.returncode == 0, p.stderr
        q = run_cli("verify", s.uri, str(expected), "--progress", "none")
        assert q.returncode == 0, q.stdout + q.stderr
    assert target.read_bytes() == raw
