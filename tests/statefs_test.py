"""The state's own storage failing (RELIABILITY.md T9, R6) and two engines (R8, P4).

Real small file systems hold the state directory: a tmpfs mounted with a tiny size (ENOSPC
when the manifest is created, when the journal is appended to, when a pass's ranges file is
written) and ext2 on a loop device over nbdfuse over nbdkit's error filter (EIO under msync
and fsync, the T2 rig). Each failure must end the run with one line and exit 4, and the same
command, run again once the storage is repaired, must finish with a correct target. Many
engines started at once on one fresh state, and two state directories on one NBD target,
must leave exactly one engine writing and the others refused cleanly (exit 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from .conftest import compare, export_to_file, require, run_cli
from .sync_test import make_disk, scribble, sync, write_areas

MiB = 1 << 20
RATE = "32M"  # nbdkit's rate filter counts bits: 4 MB/s, so a pass runs for seconds
DEADLINE = 120.0


def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting file systems needs root")


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[[str], Path]]:
    """tmpfs(size) -> a new tmpfs of that size (mount -o size=), unmounted at teardown."""
    _root()
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"tmpfs{len(mounts)}"
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(d)],
                       check=True)
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", str(d)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of directory to the last byte with a ballast file; return it
    (unlinking it frees the space)."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        vfs = os.statvfs(directory)
        if vfs.f_bavail:
            os.posix_fallocate(fd, 0, vfs.f_bavail * vfs.f_frsize)
        os.lseek(fd, 0, os.SEEK_END)
        while True:  # whatever is left, to the byte
            try:
                if os.write(fd, bytes(4096)) <= 0:
                    break
            except OSError:
                break
    finally:
        os.close(fd)
    with pytest.raises(OSError):  # really full
        with open(directory / "probe", "wb") as f:
            f.write(bytes(4096))
            f.flush()
    (directory / "probe").unlink(missing_ok=True)
    return ballast


def one_line_error(p: subprocess.CompletedProcess | tuple[int, str], code: int,
                   *words: str) -> str:
    rc, err = (p.returncode, p.stderr) if isinstance(p, subprocess.CompletedProcess) else p
    assert rc == code, f"exit {rc}, expected {code}: {err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transfer: "), err
    for w in words:
        assert w in lines[0], err
    return lines[0]


def cli_sync(source: str, target: str, state, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("sync", source, target, "--state", str(state), "--progress", "none", *args,
                   **kw)


# --- item 9: ENOSPC on a tiny tmpfs ------------------------------------------------------------

def test_no_space_for_the_manifest_cli(tmpfs, tmp_path):
    """A 32 MiB disk's manifest (8 KiB + header, 3 pages) on an 8 KiB tmpfs that the journal
    (1 page) shares. Before: the manifest was a sparse file, mapped, and the first digest
    stored into it killed the engine with SIGBUS (exit 135, no message)."""
    size = 32 * MiB
    src, dst = str(tmp_path / "src.img"), str(tmp_path / "dst.img")
    make_disk(src, size, 3)
    fs = tmpfs("8k")
    state = fs / "state"
    p = cli_sync(src, dst, state)
    line = one_line_error(p, 4, "manifest", "No space left on device")
    assert str(size // 65536 * 16 + 64) in line  # names the size it needed
    assert sorted(os.listdir(state)) == ["journal"]  # no half-made manifest left
    subprocess.run(["mount", "-o", "remount,size=1M", str(fs)], check=True)
    r = sync(src, dst, state, "--final")
    assert r["complete"]
    compare(src, dst, size=size)


def test_no_space_for_the_ranges_file_cli(tmpfs, tmp_path):
    """Pass 0 fits; then the state's file system is filled and a changed-areas pass cannot
    write its ranges file. Before: a traceback (exit 1)."""
    size = 16 * MiB
    src, dst = str(tmp_path / "src.img"), str(tmp_path / "dst.img")
    make_disk(src, size, 4)
    fs = tmpfs("1M")
    state = fs / "state"
    sync(src, dst, state, "--checkpoint", "c0")
    areas = write_areas(tmp_path / "a1.json", size, scribble(src, 5))
    ballast = fill(fs)
    p = cli_sync(src, dst, state, "--changed-areas", areas, "--checkpoint", "c1")
    one_line_error(p, 4, "ranges file", "No space left on device")
    assert not [n for n in os.listdir(state) if n.endswith(".tmp")]
    ballast.unlink()
    r = sync(src, dst, state, "--changed-areas", areas, "--checkpoint", "c1")
    assert r["pass"] == 1 and r["change_source"] == "changed areas"
    r = sync(src, dst, state, "--compare", "--final")
    assert r["complete"]
    compare(src, dst, size=size)


def test_no_space_for_a_journal_record_cli(tmpfs, tmp_path):
    """The file system is filled after pass 0; later passes append records (each begin and
    end carries a 200-character checkpoint) into the journal's last page until one needs a
    new page. That run must end with exit 4 and one line. Before: a JournalError, exit 2,
    "nothing was written", after a pass may have written the target."""
    size = 8 * MiB
    src, dst = str(tmp_path / "src.img"), str(tmp_path / "dst.img")
    make_disk(src, size, 6)
    fs = tmpfs("1M")
    state = fs / "state"
    sync(src, dst, state, "--checkpoint", "c0")
    ballast = fill(fs)
    failed = None
    for k in range(1, 12):
        scribble(src, 60 + k, count=8)
        args = ("--compare", "--checkpoint", f"{k:03d}" + "x" * 197)
        p = cli_sync(src, dst, state, *args)
        if p.returncode != 0:
            failed = k, args
            one_line_error(p, 4, "journal", "append failed: No space left on device")
            break
    assert failed is not None, "the journal never needed a new page"
    ballast.unlink()
    r = sync(src, dst, state, *failed[1])  # the same command, once there is space
    assert r["pass"] == failed[0]  # the pass that failed, not a later one
    r = sync(src, dst, state, "--compare", "--final")
    assert r["complete"]
    compare(src, dst, size=size)


# --- item 9: EIO under the state (T2 rig: ext2 on loop on nbdfuse on nbdkit's error filter) -----

@pytest.fixture
def failing_fs(tmp_path, nbdkit) -> Iterator[tuple[Path, Path, Callable[[], None]]]:
    """(mountpoint, inject, repair): ext2 on /dev/loopN over an nbdfuse file served by nbdkit
    whose pwrites fail with EIO while the file `inject` exists; repair() removes the fault,
    unmounts, runs e2fsck and mounts again. Everything is undone at teardown by pid/name."""
    _root()
    require("nbdfuse")
    require("mkfs.ext2")
    img, inject = tmp_path / "fs.img", tmp_path / "inject"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    server = nbdkit("file", str(img), "error-pwrite=EIO", "error-pwrite-rate=100%",
                    f"error-pwrite-file={inject}", filters=("error",))
    fuse_dir, mnt = tmp_path / "fuse", tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    sock = server.uri.split("socket=", 1)[1]
    fuse = subprocess.Popen(["nbdfuse", str(fuse_dir / "disk"), "--unix", sock],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    loop = None
    mounted = False
    try:
        deadline = time.monotonic() + 30
        while not (fuse_dir / "disk").exists():
            assert fuse.poll() is None, fuse.stderr.read()
            assert time.monotonic() < deadline, "nbdfuse did not mount"
            time.sleep(0.05)
        loop = subprocess.run(["losetup", "-f", "--show", str(fuse_dir / "disk")], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["mkfs.ext2", "-q", "-F", loop], check=True)
        subprocess.run(["mount", "-o", "errors=continue", loop, str(mnt)], check=True)
        mounted = True

        def repair() -> None:
            nonlocal mounted
            inject.unlink(missing_ok=True)
            subprocess.run(["umount", str(mnt)], check=True)
            mounted = False
            fsck = subprocess.run(["e2fsck", "-fy", loop], capture_output=True, text=True)
            assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
            subprocess.run(["mount", "-o", "errors=continue", loop, str(mnt)], check=True)
            mounted = True

        yield mnt, inject, repair
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", str(fuse_dir)], check=False)
        try:
            fuse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
        fuse.stderr.close()


def wait_for(predicate: Callable[[], bool], what: str, proc: subprocess.Popen | None = None,
             deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the engine ended (exit {proc.returncode}) before {what}: "
                        f"{proc.stderr.read()}")
        assert time.monotonic() < end, f"no {what} within {deadline} s"
        time.sleep(0.02)


def journal_has(state: Path, kind: str) -> bool:
    try:
        return f'"t":"{kind}"'.encode() in (state / "journal").read_bytes()
    except FileNotFoundError:
        return False


def test_eio_under_the_state_mid_pass_cli(failing_fs, nbdkit, tmp_path):
    """EIO from the state's device once a pass has committed: the next msync of the manifest
    (or fsync of the journal) fails, and that is final (R6): exit 4, one line. After the
    device is repaired the same command finishes the pass and the target equals the source."""
    mnt, inject, repair = failing_fs
    size = 16 * MiB
    src, dst, state = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), mnt / "state"
    make_disk(src, size, 8)
    source = nbdkit("file", src, "rate=" + RATE, readonly=True, filters=("rate",))
    p = subprocess.Popen([sys.executable, "-m", "transfer.cli", "sync", source.uri, dst,
                          "--state", str(state), "--progress", "none", "--commit-every", "256K"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: journal_has(state, "commit"), "commit record", p)
        inject.touch()
        rc = p.wait(timeout=DEADLINE)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    one_line_error((rc, err), 4, "Input/output error")
    assert "manifest" in err or "journal" in err, err
    repair()
    r = sync(source.uri, dst, state)
    assert r["resumed"] and r["pass"] == 0
    r = sync(source.uri, dst, state, "--compare", "--final")
    assert r["complete"]
    compare(src, dst, size=size)


# --- item 10: two engines ----------------------------------------------------------------------

def test_many_simultaneous_starts_on_a_fresh_state_cli(nbdkit, tmp_path):
    """R8: 30 `transfer sync` started together on one fresh state directory, six times.
    Before: the journal's creation raced (a shared temp name renamed away under the others, a
    journal read while empty, or one created again over a journal a winner had written): one
    to fifteen of 30 ended in a traceback, in about half the rounds. Now every start wins
    or is refused in one line, exit 2, and the target is the source."""
    size = 4 * MiB
    src = str(tmp_path / "src.img")
    make_disk(src, size, 9)
    source = nbdkit("file", src, readonly=True)
    for round_ in range(6):
        dst, state = str(tmp_path / f"dst{round_}.img"), tmp_path / f"state{round_}"
        # the CLI's main, each process held after its imports until all are up, then
        # released together (EOF on stdin): they reach the fresh state at the same moment
        argv = [sys.executable, "-c", "import sys, transfer.cli, transfer.migration.warm; "
                "sys.stdin.read(); sys.exit(transfer.cli.main(sys.argv[1:]))", "sync",
                source.uri, dst, "--state", str(state), "--progress", "none"]
        procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(30)]
        results = []
        try:
            for q in procs:
                q.stdin.close()
            for q in procs:
                results.append((q.wait(timeout=DEADLINE), q.stderr.read()))
        finally:
            for q in procs:
                if q.poll() is None:
                    q.kill()
                    q.wait()
                q.stderr.close()
        winners = [err for rc, err in results if rc == 0]
        assert winners, results
        for rc, err in results:
            if rc != 0:
                one_line_error((rc, err), 2, "in use by another engine (locked)")
        r = sync(source.uri, dst, state, "--compare", "--final")
        assert r["complete"] and r["pass"] == len(winners)  # one pass per winner, none lost
        compare(src, dst, size=size)


def test_two_state_directories_on_one_nbd_target_cli(nbdkit, tmp_path):
    """P4: an NBD export cannot be flocked or opened O_EXCL, so two state directories wrote
    one target at once. Now the second engine on this host is refused (exit 2) while the
    first runs, and runs once the first is done."""
    size = 16 * MiB
    src = str(tmp_path / "src.img")
    make_disk(src, size, 10)
    source = nbdkit("file", src, "rate=" + RATE, readonly=True, filters=("rate",))
    target = nbdkit("memory", str(size))
    env = {**os.environ, "TRANSFER_LOCK_DIR": str(tmp_path / "locks")}
    first_state, second_state = tmp_path / "s1", tmp_path / "s2"
    p = subprocess.Popen([sys.executable, "-m", "transfer.cli", "sync", source.uri, target.uri,
                          "--state", str(first_state), "--progress", "none"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: journal_has(first_state, "begin"), "begin record", p)
        second = cli_sync(source.uri, target.uri, second_state, env=env)
        one_line_error(second, 2, "another engine on this host is writing this target")
        assert p.poll() is None  # the refusal came while the first still held the target
        assert p.wait(timeout=DEADLINE) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    compare(src, export_to_file(target.uri, str(tmp_path / "out.img")), size=size)
    # the lock went with the first engine: the second state runs now
    r = sync(source.uri, target.uri, second_state, env=env)
    assert r["pass"] == 0


def test_the_target_lock_is_keyed_by_the_export_not_its_spelling(nbdkit, tmp_path,
                                                                  monkeypatch):
    """The lock module alone: another spelling of one socket (a symlink, a doubled slash) is
    the same target; another export name, or another server, is not; a plain copy is refused
    too; closing releases it."""
    import transfer
    from transfer.disks.lock import lock_target
    from transfer.errors import TargetRefused

    monkeypatch.setenv("TRANSFER_LOCK_DIR", str(tmp_path / "locks"))
    size = 4 * MiB
    src = str(tmp_path / "src.img")
    make_disk(src, size, 11)
    target = nbdkit("memory", str(size))
    other = nbdkit("memory", str(size))
    sock = target.uri.split("socket=", 1)[1]
    os.symlink(sock, tmp_path / "alias.sock")
    held = lock_target(target.uri)
    try:
        assert held is not None
        for spelling in (f"nbd+unix:///?socket={tmp_path / 'alias.sock'}",
                         f"nbd+unix:///?socket={os.path.dirname(sock)}//{os.path.basename(sock)}"):
            with pytest.raises(TargetRefused, match="another engine on this host") as e:
                lock_target(spelling)
            assert e.value.exit_code == 2
        with pytest.raises(TargetRefused, match="another engine on this host"):
            transfer.copy(src, target.uri)
        for free in (f"nbd+unix:///other?socket={sock}", other.uri):
            lock = lock_target(free)
            assert lock is not None
            lock.close()
        assert lock_target(str(tmp_path / "file.img")) is None  # files lock themselves
    finally:
        held.close()
    transfer.copy(src, target.uri)
    compare(src, export_to_file(target.uri, str(tmp_path / "out.img")), size=size)
