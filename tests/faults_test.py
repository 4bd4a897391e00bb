"""Source faults on the read path (RELIABILITY.md S2, S3): a backend error that the server turns
into a disconnect, and random transient errors. Real servers: qemu-nbd over blkdebug, nbdkit's
error filter."""

from __future__ import annotations

import json
import os

import pytest

import transfer
from transfer.errors import SourceError

from .conftest import compare, expected_digest_of_file, require, run_cli

MiB = 1 << 20
BAD = 20 * MiB  # the sector blkdebug fails: 40960 * 512


@pytest.fixture
def source(tmp_path):
    path = str(tmp_path / "src.img")
    with open(path, "wb") as f:
        f.write(os.urandom(32 * MiB))
    return path


def blkdebug(qemu_nbd, image: str, *, once: bool):
    """qemu-nbd over blkdebug failing reads of sector 40960 with EIO; qemu-nbd 7.2 answers such
    a backend error by disconnecting the client (RELIABILITY.md S2)."""
    require("qemu-nbd")
    opts = ("driver=raw,file.driver=blkdebug,file.image.driver=file,"
            f"file.image.filename={image},file.inject-error.0.event=read_aio,"
            "file.inject-error.0.errno=5,file.inject-error.0.sector=40960"
            + (",file.inject-error.0.once=on" if once else ""))
    return qemu_nbd("--image-opts", fmt=None, options=[opts])


def test_a_disconnect_on_a_bad_sector_names_that_offset(qemu_nbd, tmp_path, source):
    """S2 through the CLI: every read covering 20 MiB makes qemu-nbd hang up, with 64 other reads
    in flight beside it. The engine reconnects each time and exits 3 naming 20971520, not the
    offset of a read that happened to be in flight when the connection died."""
    src = blkdebug(qemu_nbd, source, once=False)
    p = run_cli("copy", src.uri, str(tmp_path / "t.img"), "--retries", "2", "--progress", "none",
                "--report", str(tmp_path / "r.json"))
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"at offset {BAD} " in p.stderr, p.stderr
    assert "3 attempts" in p.stderr, p.stderr


def test_one_disconnect_is_reconnected_and_the_copy_completes(qemu_nbd, tmp_path, source):
    """S2, once: the first read of 20 MiB drops the connection; the engine reconnects, reads
    again what was lost with it, and the copy is equal."""
    src = blkdebug(qemu_nbd, source, once=True)
    target = str(tmp_path / "t.img")
    r = transfer.copy(src.uri, target, retries=2)
    assert r.reconnects >= 1 and r.retries >= 1
    assert r.digest == expected_digest_of_file(source)
    compare(source, target, size=32 * MiB)


def test_a_persistent_disconnect_through_the_api_is_a_source_error(qemu_nbd, tmp_path, source):
    src = blkdebug(qemu_nbd, source, once=False)
    with pytest.raises(SourceError) as e:
        transfer.checksum(src.uri, retries=1)
    assert e.value.offset == BAD and e.value.exit_code == 3


def test_ten_percent_random_read_errors_are_outlasted(nbdkit, tmp_path, source):
    """S3: 10 % of reads fail with EIO and no server-side retry; the client's retries finish the
    copy, equal to the source."""
    src = nbdkit("file", source, "error-pread=EIO", "error-pread-rate=10%", readonly=True,
                 filters=["error"])
    target = str(tmp_path / "t.img")
    p = run_cli("copy", src.uri, target, "--progress", "none", "--request-size", "256K",
                "--report", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr
    r = json.load(open(tmp_path / "r.json"))
    assert r["retries"] >= 1
    compare(source, target, size=32 * MiB)


def test_a_stalled_server_shows_in_the_progress_lines(nbdkit, tmp_path, source):
    """S5: nbdkit's pause filter holds every request; the JSON progress lines say for how long
    nothing completed, and after the resume the copy finishes equal."""
    import socket
    import subprocess
    import sys

    control = str(tmp_path / "pause.ctl")
    src = nbdkit("file", source, f"pause-control={control}", "rate=64M", readonly=True,
                 filters=["pause", "rate"])
    target = str(tmp_path / "t.img")

    def say(cmd: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(control)
            s.sendall(cmd)
            assert s.recv(1) == cmd.upper()  # the filter echoes it once in effect

    # few small reads in flight: the pause takes effect once they are answered
    proc = subprocess.Popen([sys.executable, "-m", "transfer.cli", "copy", src.uri, target,
                             "--progress", "json", "--connections", "1", "--requests", "2",
                             "--request-size", "64K"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = iter(proc.stdout)
        first = json.loads(next(lines))  # a progress line: the copy is under way
        assert first["event"] == "progress" and not first["final"]
        say(b"p")
        for line in lines:  # wait for the stall to show
            event = json.loads(line)
            assert not event["final"], "the copy ended while the server was paused"
            if event["stalled"] >= 2.0:
                break
        say(b"r")
        last = [json.loads(line) for line in lines][-1]
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert last["final"] and last["stalled"] == 0 and last["bytes_done"] == 32 * MiB
    compare(source, target, size=32 * MiB)


def test_retries_and_reconnects_show_in_the_progress_lines(qemu_nbd, tmp_path, source):
    """S2/S5: a disconnect shows in the progress a pod reads, not only in the final report."""
    src = blkdebug(qemu_nbd, source, once=True)
    events = []
    transfer.copy(src.uri, str(tmp_path / "t.img"), retries=2, on_progress=events.append)
    assert events[-1].final and events[-1].reconnects >= 1 and events[-1].retries >= 1
