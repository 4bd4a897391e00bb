"""A migration killed after a bitmap hand-over, then cut over (RELIABILITY.md R3); a migration
interrupted by SIGINT in each of its phases (P3).

Run 1 copies pass 0 and dies in the interval wait; the guest writes A (recorded by bitmap
transfer-1); run 2 hands over (transfer-2 recording, transfer-1 disabled) and dies before it
logs pass 1; the guest writes B, which only transfer-2 records; run 3 cuts over at once. Its
final pass must copy transfer-1 and transfer-2: the target must hold A and B. The guest writes
go to fixed offsets through the daemon's writable NBD export, so what is expected is known.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from transfer.migration.migrate import migrate_async
from transfer.qmp import Qmp
from transfer.demo.servers import Nbdkit, QemuStorageDaemon
from transfer.migration.warm import sync_async
from transfer.demo.synth import make_image

from .conftest import compare, expected_digest_of_file, export_to_file, require

MiB = 1 << 20
SIZE = 16 * MiB
A = (1 * MiB, b"\xa1" * (128 << 10))  # written while only transfer-1 records
B = (5 * MiB, b"\xb2" * (128 << 10))  # written after the hand-over: only transfer-2 records


class Disk:
    """qemu-storage-daemon holding a raw disk; the test is the guest, writing through `rw`."""

    def __init__(self, tmp_path, seed: int, size: int) -> None:
        require("qemu-storage-daemon")
        self.dir = tmp_path
        self.image = str(tmp_path / "disk.raw")
        self.size = size
        make_image(self.image, size, seed)
        self.qmp = str(tmp_path / "qmp.sock")
        self.nbd = str(tmp_path / "nbd.sock")
        self.qsd = QemuStorageDaemon(self.nbd, self.image, qmp=self.qmp, fmt="raw")
        self.qsd.start()

    def write(self, where: tuple[int, bytes]) -> None:
        import nbd

        h = nbd.NBD()
        h.connect_uri(self.qsd.uri)
        try:
            h.pwrite(where[1], where[0])
            h.flush()
        finally:
            h.shutdown()

    def bitmaps(self) -> dict[str, dict]:
        """The node's bitmaps (QMP takes one client: only while no migration runs)."""
        with Qmp(self.qmp) as q:
            return q.bitmaps("disk0")

    def contents(self) -> str:
        return export_to_file(self.qsd.uri, str(self.dir / "now.raw"))

    def close(self) -> None:
        self.qsd.stop()


@pytest.fixture
def disk(tmp_path):
    made: list[Disk] = []

    def make(seed: int, size: int = SIZE) -> Disk:
        d = Disk(tmp_path, seed, size)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def wait_for(what, cond, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def read_log(state) -> dict | None:
    try:
        return json.loads((state / "migrate.json").read_text())
    except (OSError, ValueError):
        return None


def holds(path: str, where: tuple[int, bytes]) -> bool:
    with open(path, "rb") as f:
        f.seek(where[0])
        return f.read(len(where[1])) == where[1]


def paused_target(tmp_path) -> tuple[str, str, Nbdkit]:
    """A SIZE-byte target file served by nbdkit with the pause filter: (file, control socket,
    the started server); the caller stops the server."""
    target_file, control = str(tmp_path / "t.img"), str(tmp_path / "pause.sock")
    with open(target_file, "wb") as f:
        f.truncate(SIZE)
    server = Nbdkit(str(tmp_path / "target.sock"), "file", target_file,
                    f"pause-control={control}", filters=["pause"]).start()
    return target_file, control, server


def end_ours(pids) -> None:
    """After a failed test: end the --on-cutover shell and sleep we started, if still there
    (checked by their command line, so a reused pid is left alone)."""
    for pid in pids:
        if alive(pid) and b"sleep 600" in open(f"/proc/{pid}/cmdline", "rb").read().replace(
                b"\0", b" "):
            os.kill(pid, signal.SIGKILL)

def pause(control: str, command: bytes) -> None:
    """nbdkit's pause filter: b"p" holds every later request until b"r"; it answers upper case
    once that took effect."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(control)
        s.sendall(command)
        assert s.recv(1) == command.upper()


@pytest.mark.timeout(300)
def test_a_cutover_after_a_run_killed_past_its_hand_over_copies_both_bitmaps(disk, tmp_path):
    """Through the CLI, with SIGKILL. The target is a file served by nbdkit with the pause
    filter: run 2 is killed once its log records the hand-over, with target writes held, so it
    cannot have finished pass 1 (the state is the one the audit found: transfer-2 recording,
    transfer-1 disabled, pass 1 not logged)."""
    require("nbdkit")
    d = disk(21)
    target_file, control, target = paused_target(tmp_path)
    state, report = tmp_path / "st", tmp_path / "r.json"
    argv = [sys.executable, "-m", "transfer.cli", "migrate", target.uri, "--type", "warm",
            "--qmp", d.qmp, "--node", "disk0", "--state", str(state), "--nbd-socket", d.nbd,
            "--precopy-interval", "600s"]
    try:
        # run 1: pass 0, then killed in its interval wait (its pass line is printed just before)
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            line = wait_for("pass 0's line", lambda: p.stderr.readline())
            assert line.startswith("transfer: pass   0:"), line
        finally:
            p.kill()  # our own child
            p.wait()
            p.stderr.close()
        assert read_log(state)["next"] == 1
        d.write(A)
        # run 2: its hand-over, then killed before it can log pass 1
        pause(control, b"p")
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for("run 2's hand-over in the log", lambda: "1" in read_log(state)["handover"])
        finally:
            p.kill()
            p.wait()
        pause(control, b"r")
        bitmaps = d.bitmaps()
        assert bitmaps["transfer-2"]["recording"] and not bitmaps["transfer-1"]["recording"]
        assert read_log(state)["next"] == 1
        d.write(B)
        # run 3: cut over now
        p = subprocess.run(argv + ["--cutover", "now", "--report", str(report)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        r = json.loads(report.read_text())
    finally:
        target.stop()
    assert holds(target_file, A) and holds(target_file, B)
    compare(d.contents(), target_file, size=SIZE)
    assert expected_digest_of_file(target_file) == r["digest"]
    final = r["passes"][-1]
    assert final["final"] and final["change_source"] == "dirty bitmap transfer-2", final
    assert "transfer-1 was merged into transfer-2" in final["note"], final


@pytest.mark.timeout(300)
def test_a_final_pass_after_a_pass_committed_but_not_logged_copies_both_bitmaps(disk, tmp_path):
    """Through the Python API. Pass 1 is committed by sync but the migration's log still says
    pass 1 is next: what a run killed between sync's end record and the log's save leaves
    (the test takes the hand-over and pass 1 itself, as migrate does, then stops). A cutover
    must still copy what transfer-2 recorded after that hand-over."""
    d = disk(22)
    target, state = str(tmp_path / "t.img"), tmp_path / "st"

    class Stop(Exception):
        pass

    def after(p) -> None:
        raise Stop(p.pass_)  # run 1 ends after pass 0 is logged

    common = dict(kind="warm", qmp=d.qmp, node="disk0", state=str(state), nbd_socket=d.nbd)
    with pytest.raises(Stop):
        asyncio.run(migrate_async(target, precopy_interval=600, on_pass=after, **common))
    assert read_log(state)["next"] == 1
    d.write(A)
    with Qmp(d.qmp) as q:  # run 2's hand-over and pass 1, up to sync's end record
        q.execute("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "transfer-2"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0",
                                                            "name": "transfer-1"}}])
        q.execute("block-export-add", type="nbd", id="transfer-src", **{"node-name": "disk0"},
                  name="transfer-src", writable=False, bitmaps=["transfer-1"])
    one = asyncio.run(sync_async(f"nbd+unix:///transfer-src?socket={d.nbd}", target,
                                 state=str(state / "sync"), dirty_bitmap="transfer-1",
                                 checkpoint="transfer-1"))
    assert one.pass_ == 1 and one.delta_bytes > 0 and holds(target, A)
    assert read_log(state)["next"] == 1  # not logged: the run "died" here
    d.write(B)
    r = asyncio.run(migrate_async(target, cutover="now", **common))
    assert holds(target, A) and holds(target, B)
    compare(d.contents(), target, size=SIZE)
    assert expected_digest_of_file(target) == r.digest
    final = r.passes[-1]
    assert final.final and final.change_source == "dirty bitmap transfer-2", final
    assert "transfer-1 was merged into transfer-2" in final.note, final



@pytest.mark.timeout(300)
def test_a_final_pass_killed_after_its_merge_then_a_warm_run_compares(disk, tmp_path):
    """The merged final pass itself dies (SIGKILL once its log holds its hand-over time: the
    merge, and the disable of transfer-2, are done; target writes are held). The VM runs again
    and writes C, which no bitmap records; a warm run on this state finds transfer-2 disabled
    with none after it and compares (R2) instead of trusting it; the cutover then holds A, B
    and C."""
    require("nbdkit")
    d = disk(25)
    target_file, control, target = paused_target(tmp_path)
    state, report = tmp_path / "st", tmp_path / "r.json"
    argv = migrate_argv(d, target.uri, state, "--precopy-interval", "600s")
    C = (9 * MiB, b"\xc3" * (64 << 10))

    def killed_when(what, cond, *extra: str) -> None:
        p = subprocess.Popen(argv + list(extra), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            wait_for(what, cond)
        finally:
            p.kill()  # our own child
            p.wait()

    try:
        killed_when("pass 0 logged", lambda: (read_log(state) or {"next": 0})["next"] == 1)
        d.write(A)
        pause(control, b"p")
        killed_when("run 2's hand-over", lambda: "1" in read_log(state)["handover"])
        d.write(B)
        killed_when("the final pass's hand-over", lambda: "2" in read_log(state)["handover"],
                    "--cutover", "now")
        pause(control, b"r")
        assert read_log(state)["next"] == 2
        bitmaps = d.bitmaps()
        assert set(bitmaps) == {"transfer-2"} and not bitmaps["transfer-2"]["recording"]
        d.write(C)
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            line = wait_for("pass 2's line", lambda: p.stderr.readline())
        finally:
            p.kill()
            p.wait()
            p.stderr.close()
        assert line.startswith("transfer: pass   2:"), line
        assert "bitmap transfer-2 stopped recording (an interrupted final pass)" in line, line
        p = subprocess.run(argv + ["--cutover", "now", "--report", str(report)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        r = json.loads(report.read_text())
    finally:
        target.stop()
    assert holds(target_file, A) and holds(target_file, B) and holds(target_file, C)
    compare(d.contents(), target_file, size=SIZE)
    assert expected_digest_of_file(target_file) == r["digest"]
    assert [(x["pass"], x["final"]) for x in r["passes"]] == [(0, False), (2, False), (3, True)]


def test_a_run_killed_after_its_final_pass_completed_reports_success(disk, tmp_path):
    """sync completed the final pass but the migration's log was not saved (the log a run
    killed right then leaves: written before the pass). Running it again says it is done
    (exit 0, the digest, nothing copied) instead of refusing the complete state (exit 2)."""
    d = disk(27)
    target, state, report = str(tmp_path / "t.img"), tmp_path / "st", tmp_path / "r.json"
    argv = migrate_argv(d, target, state, "--progress", "none", "--report", str(report))
    argv[argv.index("warm")] = "cold"
    p = subprocess.run(argv + ["--on-cutover", "true"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    first = json.loads(report.read_text())
    (state / "migrate.json").write_text(json.dumps(
        {"next": 0, "passes": [], "handover": {}, "node": "disk0", "type": "cold"}))
    marker = tmp_path / "ran"
    p = subprocess.run(argv + ["--on-cutover", f"touch {marker}"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    again = json.loads(report.read_text())
    assert again["digest"] == first["digest"] == expected_digest_of_file(target)
    assert again["cutover"]["note"] == "the final pass completed in an earlier run"
    assert not marker.exists()  # the VM is not stopped again
    compare(d.contents(), target, size=SIZE)


def migrate_argv(d: Disk, target: str, state, *args: str) -> list[str]:
    return [sys.executable, "-m", "transfer.cli", "migrate", target, "--type", "warm",
            "--qmp", d.qmp, "--node", "disk0", "--state", str(state), "--nbd-socket", d.nbd,
            *args]


def interrupt(p: subprocess.Popen) -> tuple[int, str]:
    """SIGINT our child; its exit code and stderr."""
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def resume_and_check(d: Disk, target_file: str, target: str, state, tmp_path) -> dict:
    """The same command with --cutover now finishes the migration; the target is right."""
    report = tmp_path / "done.json"
    p = subprocess.run(migrate_argv(d, target, state, "--cutover", "now", "--on-cutover", "true",
                                    "--report", str(report)),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(report.read_text())
    compare(d.contents(), target_file, size=d.size)
    assert expected_digest_of_file(target_file) == r["digest"]
    assert r["cutover"]["vm_stopped"] is True and r["cutover"]["on_cutover"].startswith("stopped")
    return r


@pytest.mark.timeout(300)
def test_sigint_in_the_precopy_wait_exits_5_and_resumes(disk, tmp_path):
    d = disk(23)
    target, state, report = str(tmp_path / "t.img"), tmp_path / "st", tmp_path / "r.json"
    p = subprocess.Popen(migrate_argv(d, target, state, "--precopy-interval", "600s",
                                      "--on-cutover", "true", "--report", str(report)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = wait_for("pass 0's line", lambda: p.stderr.readline())
        assert line.startswith("transfer: pass   0:"), line
        code, err = interrupt(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert code == 5, err
    assert ("interrupted by a signal in the precopy wait; the VM was not stopped "
            "(--on-cutover had not run)") in err, err
    r = json.loads(report.read_text())
    assert r["exit_code"] == 5 and r["cutover"]["vm_stopped"] is False
    assert [x["pass"] for x in r["passes"]] == [0]
    resume_and_check(d, target, target, state, tmp_path)


@pytest.mark.timeout(300)
def test_sigint_in_a_pass_exits_5_and_resumes(disk, tmp_path):
    """The target (nbdkit, rate filter) takes pass 0 at 4 MiB/s: the signal comes while it
    copies (after its first progress line). The pass commits what it finished and stops."""
    require("nbdkit")
    d = disk(26, 64 * MiB)  # 60 MiB of data: about 15 s at that rate
    target_file, rate = str(tmp_path / "t.img"), tmp_path / "rate"
    with open(target_file, "wb") as f:
        f.truncate(d.size)
    rate.write_text("32M\n")
    server = Nbdkit(str(tmp_path / "target.sock"), "file", target_file, f"rate-file={rate}",
                    filters=["rate"]).start()
    state, report = tmp_path / "st", tmp_path / "r.json"
    try:
        p = subprocess.Popen(migrate_argv(d, server.uri, state, "--precopy-interval", "600s",
                                          "--on-cutover", "true", "--progress", "json",
                                          "--report", str(report)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = wait_for("a progress line", lambda: p.stdout.readline())
            assert json.loads(line)
            p.send_signal(signal.SIGINT)
            fast = tmp_path / "rate.new"  # then let what is in flight drain at full speed
            fast.write_text("100G\n")
            os.replace(fast, rate)
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 5, err
        assert ("interrupted by a signal during pass 0; the VM was not stopped "
                "(--on-cutover had not run)") in err, err
        r = json.loads(report.read_text())
        assert r["exit_code"] == 5 and r["passes"] == [] and r["cutover"]["vm_stopped"] is False
        assert read_log(state)["next"] == 0
        r = resume_and_check(d, target_file, server.uri, state, tmp_path)
        assert r["passes"][0]["pass"] == 0 and r["passes"][-1]["final"]
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_sigint_during_on_cutover_terminates_the_command_and_exits_5(disk, tmp_path):
    """An --on-cutover command that never ends (a shell waiting for its `sleep 600`), with a
    --cutover-timeout of 600 s: SIGINT terminates its process group, exits 5 saying the VM
    may still run, and no final pass was taken."""
    d = disk(24)
    target, state, report = str(tmp_path / "t.img"), tmp_path / "st", tmp_path / "r.json"
    pids = tmp_path / "pids"
    hang = f"sh -c 'sleep 600 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait'"
    p = subprocess.Popen(migrate_argv(d, target, state, "--cutover", "now", "--on-cutover", hang,
                                      "--cutover-timeout", "600s", "--report", str(report)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started: list[int] = []
    try:
        try:
            started += map(int, wait_for("the command's pids", lambda: pids.exists()
                                         and pids.read_text().split()))
            code, err = interrupt(p)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert code == 5, err
        assert ("interrupted by a signal while the --on-cutover command ran; the --on-cutover "
                "command was terminated before it completed: the VM may still run; no final "
                "pass finished") in err, err
        for pid in started:  # the shell and its sleep: gone, or a zombie until init reaps it
            wait_for(f"pid {pid} to end", lambda: not alive(pid))
    finally:
        end_ours(started)
    r = json.loads(report.read_text())
    assert r["exit_code"] == 5 and r["cutover"]["vm_stopped"] is False
    assert [x["final"] for x in r["passes"]] == [False]  # pass 0 only, no final
    resume_and_check(d, target, target, state, tmp_path)


def alive(pid: int) -> bool:
    """Is pid a live process (not gone, not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(300)
def test_an_on_cutover_command_past_its_timeout_is_terminated_with_its_children(disk, tmp_path):
    """--cutover-timeout 1s on a command that never ends: exit 3 naming the timeout, the
    command's process group (the shell and its sleep) is gone, the report says the VM may
    still run, and the state resumes."""
    d = disk(28)
    target, state, report = str(tmp_path / "t.img"), tmp_path / "st", tmp_path / "r.json"
    pids = tmp_path / "pids"
    hang = f"sh -c 'sleep 600 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait'"
    p = subprocess.run(migrate_argv(d, target, state, "--cutover", "now", "--on-cutover", hang,
                                    "--cutover-timeout", "1s", "--report", str(report)),
                       capture_output=True, text=True, timeout=120)
    started = [int(x) for x in pids.read_text().split()]
    try:
        assert p.returncode == 3, p.stderr
        assert ("the --on-cutover command did not finish within 1 s and was terminated; the VM "
                "may still run, no final pass was taken") in p.stderr, p.stderr
        for pid in started:
            wait_for(f"pid {pid} to end", lambda: not alive(pid))
    finally:
        end_ours(started)
    r = json.loads(report.read_text())
    assert r["exit_code"] == 3 and r["cutover"]["vm_stopped"] is False
    assert r["cutover"]["on_cutover"] == "unknown: --on-cutover timed out and was terminated"
    resume_and_check(d, target, target, state, tmp_path)
