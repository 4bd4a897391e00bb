"""The command line as a user and a pod see it: exit codes, one-line errors, progress, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from .conftest import compare, expected_digest_of_file, run_cli

MiB = 1 << 20


def one_line_error(p, code, *needles):
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "src.img")
    with open(path, "wb") as f:
        f.write(os.urandom(3 * MiB))
        f.truncate(16 * MiB)
    return path


def test_help_documents_the_exit_codes():
    p = run_cli("copy", "--help")
    assert p.returncode == 0
    for code in ("0  success", "2  bad input", "3  source I/O", "4  target I/O", "5  interrupted"):
        assert code in p.stdout


@pytest.mark.parametrize("source, needle", [
    ("ftp://host/disk", "unsupported scheme 'ftp'"),
    ("http://host/disk", "an images URL is http(s)://HOST[:PORT]/images/TICKET"),
    ("nbd+unix:///?socket=/nonexistent/x.sock", "socket /nonexistent/x.sock does not exist"),
    ("nbd+unix:///export", "needs ?socket=PATH"),
    ("/nonexistent/disk.img", "No such file or directory"),
    ("/", "not a regular file or a block device"),
])
def test_bad_source_addresses(source, needle):
    one_line_error(run_cli("copy", source, "null:"), 2, "transfer: source", needle)


def test_unreadable_source_file(tmp_path, image):
    os.chmod(image, 0)
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "transfer.cli", "copy", image, "null:"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    one_line_error(p, 2, "transfer: source", "Permission denied")


def test_secrets_never_reach_the_output(tmp_path, image):
    p = run_cli("copy", "nbd://admin:CANARY1@127.0.0.1:1/exp?token=CANARY2",
                str(tmp_path / "t.img"))
    line = one_line_error(p, 3, "admin:***@127.0.0.1:1")
    assert "CANARY" not in p.stderr + p.stdout, line
    p = run_cli("copy", image, "nbd+unix://u:CANARY3@/x?socket=/nonexistent&tls-psk-file=CANARY4")
    assert p.returncode == 2 and "CANARY" not in p.stderr + p.stdout, p.stderr


def test_source_read_error_names_the_offset_and_writes_nothing_there(nbdkit, tmp_path, image):
    """S1: EIO on every read; exit 3 naming the offset, and the target's bytes at that offset
    are what they were (nothing, zeroes least of all, was written for the failed range)."""
    import re

    src = nbdkit("file", image, "error-pread=EIO", "error-pread-rate=100%", readonly=True,
                 filters=["error"])
    target = tmp_path / "t.img"
    target.write_bytes(b"\x5a" * (16 * MiB))
    line = one_line_error(run_cli("copy", src.uri, str(target), "--connections=1",
                                  "--retries=2"), 3,
                          "transfer: source nbd+unix", "read failed", "3 attempts", "at offset",
                          "is incomplete")
    assert "EIO" in line or "Input/output error" in line
    offset, length = map(int, re.search(r"at offset (\d+) \(length (\d+)\)", line).groups())
    with open(target, "rb") as f:
        f.seek(offset)
        assert f.read(length) == b"\x5a" * length


def test_bad_sector_at_an_exact_offset(nbdkit, tmp_path, image):
    """RELIABILITY.md S1c: only the request covering the bad sector fails, and it is named."""
    bad = 2 * MiB + 4096
    script = (f'BAD={bad}; if [ $4 -le $BAD ] && [ $(($4+$3)) -gt $BAD ]; then echo EIO >&2; '
              f'exit 1; fi; dd if={image} skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none')
    src = nbdkit("eval", f"get_size=stat -Lc %s {image}", f"pread={script}", readonly=True)
    line = one_line_error(run_cli("copy", src.uri, str(tmp_path / "t.img"), "--request-size=1M",
                                  "--retries=1"), 3, "read failed")
    assert f"at offset {2 * MiB} (length {MiB})" in line


def test_target_write_error(nbdkit, image):
    dst = nbdkit("memory", str(16 * MiB), "error-pwrite=EIO", "error-pwrite-rate=100%",
                 filters=["error"])
    one_line_error(run_cli("copy", image, dst.uri), 4, "transfer: target", "write failed",
                   "at offset")


def test_target_out_of_space(tmp_path, image):
    """T1: a file on a 2 MiB tmpfs for 3 MiB of data. The pre-flight refuses it before
    writing (exit 2, no file); with --force, ENOSPC on write is a target failure, not a
    success, and the full-size file it created is removed, not left looking done."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], check=True)
    try:
        target = mnt / "t.img"
        one_line_error(run_cli("copy", image, str(target)), 2, "transfer: target",
                       "bytes free", "3145728 bytes of data")
        assert not target.exists()
        one_line_error(run_cli("copy", image, str(target), "--force"), 4, "transfer: target",
                       "No space left on device", "incomplete target file was removed")
        assert not target.exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_failed_copy_names_an_existing_target_incomplete(nbdkit, tmp_path, image):
    """T1: a target the run did not create is kept (it may be a PVC), and the error says it is
    incomplete; a file the run created is removed."""
    target = tmp_path / "t.img"
    target.write_bytes(bytes(16 * MiB))
    src = nbdkit("file", image, "error-pread=EIO", "error-pread-rate=100%", readonly=True,
                 filters=["error"])
    one_line_error(run_cli("copy", src.uri, str(target), "--retries", "0"), 3,
                   f"the target {target} is incomplete")
    assert target.stat().st_size == 16 * MiB
    created = tmp_path / "new.img"
    one_line_error(run_cli("copy", src.uri, str(created), "--retries", "0"), 3,
                   "the incomplete target file was removed")
    assert not created.exists()


def _slow_source(nbdkit, tmp_path):
    """96 MiB of data at 25 MiB/s (the rate filter counts bits): about 4 s to copy."""
    image = str(tmp_path / "big.img")
    with open(image, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
    return nbdkit("file", image, "rate=200M", readonly=True, filters=["rate"])


def _copy_and_then(src, tmp_path, action, *extra) -> subprocess.CompletedProcess:
    """Start a copy from src, run action(proc) once it reports progress, let it finish."""
    proc = subprocess.Popen([sys.executable, "-m", "transfer.cli", "copy", src.uri,
                             str(tmp_path / "t.img"), "--progress=json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the first JSON progress line: the copy is under way
        assert json.loads(line)["event"] == "progress"
        action(proc)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def test_server_dying_mid_copy(nbdkit, tmp_path):
    src = _slow_source(nbdkit, tmp_path)
    p = _copy_and_then(src, tmp_path, lambda proc: os.kill(src.pid, signal.SIGKILL), "--retries=2")
    one_line_error(p, 3, "transfer: source nbd+unix")


def test_server_restarted_mid_copy_is_reconnected(nbdkit, tmp_path):
    """RELIABILITY.md S4: the server is killed and comes back on the same socket; the copy
    reconnects, reads again what was lost, and completes equal."""
    src = _slow_source(nbdkit, tmp_path)
    report = tmp_path / "r.json"

    def restart(proc):
        os.kill(src.pid, signal.SIGKILL)
        src.proc.wait()
        src.start()  # the same command: same socket, same image

    p = _copy_and_then(src, tmp_path, restart, "--report", str(report))
    assert p.returncode == 0, p.stderr
    r = json.load(open(report))
    assert r["reconnects"] >= 1 and r["retries"] >= 1
    assert r["digest"] == expected_digest_of_file(str(tmp_path / "big.img"))
    compare(str(tmp_path / "big.img"), str(tmp_path / "t.img"), size=96 * MiB)


def test_transient_read_errors_are_retried(nbdkit, tmp_path, image):
    """RELIABILITY.md S1b: EIO while a trigger file exists; the copy outlasts the outage."""
    trigger = tmp_path / "inject"
    trigger.touch()
    src = nbdkit("file", image, "error-pread=EIO", "error-pread-rate=100%",
                 f"error-pread-file={trigger}", readonly=True, filters=["error"])
    report = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "transfer.cli", "copy", src.uri,
                             str(tmp_path / "t.img"), "--progress=json", "--report", str(report)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the outage ends once a progress line shows a retry
            event = json.loads(line)
            assert not event["final"], "the copy ended during the outage"
            if event["retries"] >= 1:
                break
        trigger.unlink()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    r = json.load(open(report))
    assert r["retries"] >= 1 and r["digest"] == expected_digest_of_file(image)
    compare(image, str(tmp_path / "t.img"), size=16 * MiB)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_interrupts_with_its_own_exit_code(nbdkit, tmp_path, sig):
    src = _slow_source(nbdkit, tmp_path)
    p = _copy_and_then(src, tmp_path, lambda proc: proc.send_signal(sig))
    one_line_error(p, 5, "interrupted")
    assert src.proc.poll() is None  # the server is still fine: we drained before leaving


def test_json_progress_and_report(nbdkit, tmp_path, image):
    src = nbdkit("file", image, readonly=True)
    target, report = str(tmp_path / "t.img"), str(tmp_path / "report.json")
    p = run_cli("copy", src.uri, target, "--progress=json", "--report", report)
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]
    assert events and all(e["event"] == "progress" for e in events)
    done = [e["bytes_done"] for e in events]
    assert done == sorted(done)
    assert events[-1]["final"] and events[-1]["bytes_done"] == events[-1]["bytes_total"] == 16 * MiB
    r = json.load(open(report))
    for key in ("size", "bytes_copied", "bytes_zeroed", "bytes_skipped", "seconds", "digest",
                "connections", "requests", "native"):
        assert key in r
    assert r["size"] == 16 * MiB and r["bytes_copied"] == 3 * MiB
    assert r["bytes_skipped"] == 13 * MiB  # the new file reads as zeroes: nothing written there
    assert r["digest"] == expected_digest_of_file(image)
    assert r["native"] == {"zeroscan": "cython", "blockhash": "cython", "fileops": "cython",
                           "intervals": "cython", "blockstatus": "cython"}
    compare(image, target, size=16 * MiB)


def test_progress_none_is_silent(tmp_path, image):
    p = run_cli("copy", image, str(tmp_path / "t.img"), "--progress=none")
    assert p.returncode == 0 and p.stdout == "" and p.stderr == ""


def test_demo(tmp_path):
    p = run_cli("demo", "--size=32M", "--progress=none", cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["size"] == 32 * MiB and report["digest"].startswith("xxh3-128:64k:")
    assert os.listdir(tmp_path) == []  # the demo leaves nothing behind


def test_stalled_server_is_given_up_on_after_the_timeout(nbdkit, tmp_path, image):
    """RELIABILITY.md S5/R9: libnbd has no timeout; every read gets a deadline of ours."""
    src = nbdkit("file", image, "rdelay=60", readonly=True, filters=["delay"])
    line = one_line_error(run_cli("copy", src.uri, str(tmp_path / "t.img"), "--timeout=1",
                                  "--retries=1", timeout=60), 3, "transfer: source")
    assert "no reply from the server for 1 s" in line


def test_stalled_target_is_given_up_on_after_the_timeout(nbdkit, tmp_path, image):
    """R9 on the target side: writes and zeroes are synchronous libnbd calls, which have no
    timeout; a watchdog shuts the socket of a call silent past --timeout, so the copy fails
    (exit 4) instead of hanging on a target that never answers."""
    target = tmp_path / "t.img"
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    dst = nbdkit("file", str(target), "delay-write=60", "delay-zero=60", filters=["delay"])
    # run_cli's own timeout (60 s) would fail the test long before the server's 60 s delay
    # ends; the message says the watchdog, not the server, ended the call
    line = one_line_error(run_cli("copy", image, dst.uri, "--timeout=1", "--force", timeout=50),
                          4, "transfer: target")
    assert "no reply from the server for 1 s" in line


def test_absurd_export_size_is_refused_before_any_write(nbdkit, tmp_path):
    """RELIABILITY.md S9: an export of 2^63-1 bytes is not believed."""
    src = nbdkit("eval", "get_size=echo 9223372036854775807", "pread=exit 1", readonly=True)
    target = tmp_path / "t.img"
    one_line_error(run_cli("copy", src.uri, str(target)), 3, "export size", "out of range")
    assert not target.exists()


def test_zero_blocks_inside_data_are_found_and_not_written(tmp_path):
    """The zero scan: a source whose middle MiB is written zeroes (allocated: SEEK_DATA calls it
    data, so it is read) copied to a new file: the report counts that MiB as skipped, not
    copied, and the target holds a hole there, not written zeroes."""
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(MiB) + bytes(MiB) + os.urandom(MiB))
        os.fsync(f.fileno())
    assert os.stat(src).st_blocks * 512 >= 3 * MiB  # allocated, zeroes included
    target, report = tmp_path / "t.img", tmp_path / "r.json"
    p = run_cli("copy", str(src), str(target), "--progress", "none", "--report", str(report))
    assert p.returncode == 0, p.stderr
    r = json.load(open(report))
    assert r["bytes_read"] == 3 * MiB
    assert r["bytes_copied"] == 2 * MiB and r["bytes_skipped"] == MiB
    assert os.stat(target).st_blocks * 512 <= 2 * MiB + 64 * 1024  # a hole where the zeroes were
    compare(str(src), str(target), size=3 * MiB)
