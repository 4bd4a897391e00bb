"""Real-component fixtures: nbdkit and qemu-nbd servers, loop devices, the CLI.

Every server is our child, stopped by its own pid at teardown even when the
test fails; every loop device is one we attached, detached by its name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
from typing import Callable, Iterator

import pytest
import xxhash

from transfer.demo.servers import Nbdkit, QemuNbd, Server

BLOCK = 64 * 1024


def require(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (tools/setup installs it)")


def _servers(tmp_path, program: str, make: Callable[..., Server]) -> Iterator[Callable[..., Server]]:
    """A factory fixture body: start servers of one kind on sockets in tmp_path, stop them all."""
    require(program)
    servers: list[Server] = []

    def start(*args, **kw) -> Server:
        server = make(str(tmp_path / f"{program}{len(servers)}.sock"), *args, **kw)
        servers.append(server)
        return server.start()

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def nbdkit(tmp_path) -> Iterator[Callable[..., Server]]:
    """nbdkit(plugin, *args, readonly=False, filters=(), options=()) -> a started server."""
    yield from _servers(tmp_path, "nbdkit", Nbdkit)


@pytest.fixture
def qemu_nbd(tmp_path) -> Iterator[Callable[..., Server]]:
    """qemu_nbd(image, fmt="qcow2", readonly=True) -> a started server."""
    yield from _servers(tmp_path, "qemu-nbd", QemuNbd)


@pytest.fixture
def loop_device(tmp_path) -> Iterator[Callable[..., str]]:
    """loop_device(size, fill=None) -> /dev/loopN over a new backing file; detached at teardown."""
    require("losetup")
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    devices: list[str] = []

    def attach(size: int, fill: bytes | None = None) -> str:
        backing = tmp_path / f"loop{len(devices)}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
            if fill is not None:
                f.write((fill * (size // len(fill) + 1))[:size])
        dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
        devices.append(dev)
        return dev

    yield attach
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], check=False)


def run_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:
    """Run `transfer ARGS` with this interpreter; returns the completed process."""
    return subprocess.run([sys.executable, "-m", "transfer.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def expected_digest_of_file(path: str) -> str:
    """The disk digest per DESIGN.md, computed here with the xxhash package alone.

    Deliberately not transfer.demo.file_digest: the oracle shares no code with the project.
    """
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(xxhash.xxh3_128(block).digest())
            size += len(block)
    h.update(struct.pack("<QI", size, BLOCK))
    return "xxh3-128:64k:" + h.hexdigest()


def export_to_file(uri: str, path: str) -> str:
    """Read a whole NBD export into a raw file with plain libnbd calls (not the engine).

    qemu-img is not used here because it rounds sizes up to 512 bytes.
    """
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        with open(path, "wb") as f:
            for off in range(0, size, 4 << 20):
                f.write(h.pread(min(4 << 20, size - off), off))
    finally:
        h.shutdown()
    return path


def disk_size(disk: str) -> int:
    if disk.startswith("nbd"):
        import nbd

        h = nbd.NBD()
        h.connect_uri(disk)
        try:
            return h.get_size()
        finally:
            h.shutdown()
    fd = os.open(disk, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def compare(source: str, target: str, *, size: int) -> None:
    """C1: qemu-img compare (not strict: allocation may differ on purpose) plus a size check."""
    assert disk_size(source) == size, f"{source} is not {size} bytes"
    assert disk_size(target) == size, f"{target} is not {size} bytes"
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, target],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"qemu-img compare {source} {target}: {p.stdout}{p.stderr}"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(autouse=True, scope="session")
def _nbd_target_locks(tmp_path_factory) -> Iterator[None]:
    """NBD targets' host-local locks (transfer.disks.lock) go to a directory of this run, not
    the host's /run/lock/transfer, which would keep a file per export the tests ever wrote;
    the CLI processes the tests start inherit it. A test that needs its own sets its own."""
    if os.environ.get("TRANSFER_LOCK_DIR"):
        yield
        return
    os.environ["TRANSFER_LOCK_DIR"] = str(tmp_path_factory.mktemp("nbd-target-locks"))
    try:
        yield
    finally:
        os.environ.pop("TRANSFER_LOCK_DIR", None)
