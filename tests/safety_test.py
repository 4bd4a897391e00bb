"""Target safety: each refusal happens before the first write and leaves the target untouched."""

from __future__ import annotations

import os
import subprocess

import pytest

import transfer
from transfer.errors import TargetRefused

from .conftest import compare, run_cli, sha256_of
from .oplog_test import ops

MiB = 1 << 20


@pytest.fixture
def source(tmp_path):
    path = str(tmp_path / "source.img")
    with open(path, "wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(8 * MiB)
    return path


def refused(source, target, match, *extra):
    """Run the CLI, expect exit 2 with one clear line naming the target and no traceback."""
    p = run_cli("copy", source, target, "--progress=none", *extra)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("transfer: target ")
    assert match in p.stderr, p.stderr
    return p


def test_smaller_nbd_target_is_refused_without_any_request(nbdkit, tmp_path, source):
    log = str(tmp_path / "dst.log")
    dst = nbdkit("memory", str(4 * MiB), f"logfile={log}", filters=["log"])
    refused(source, dst.uri, "smaller than the source (4194304 < 8388608 bytes)")
    dst.stop()
    issued = ops(log)
    assert not (issued["Write"] or issued["Zero"] or issued["Trim"])


def test_smaller_block_device_is_refused(loop_device, source):
    dev = loop_device(4 * MiB, fill=b"\xee")
    before = sha256_of(dev)
    refused(source, dev, "smaller than the source")
    assert sha256_of(dev) == before


def test_smaller_file_is_refused(tmp_path, source):
    target = tmp_path / "small.img"
    target.write_bytes(b"\xee" * MiB)
    refused(source, str(target), "smaller than the source")
    assert target.read_bytes() == b"\xee" * MiB


def test_the_source_itself_is_refused(tmp_path, source):
    before = sha256_of(source)
    refused(source, source, "the target is the source")
    os.link(source, tmp_path / "hardlink.img")
    refused(source, str(tmp_path / "hardlink.img"), "the target is the source")
    assert sha256_of(source) == before


def test_a_loop_device_over_the_source_is_refused(source):
    dev = subprocess.run(["losetup", "-f", "--show", source], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        refused(source, dev, "the target is the source")
        # and the other way round: the loop device as the source, its backing file as target
        p = run_cli("copy", dev, source, "--progress=none")
        assert p.returncode == 2 and "the target is the source" in p.stderr
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_held_block_device_is_refused(loop_device, source):
    dev = loop_device(8 * MiB, fill=b"\xee")
    before = sha256_of(dev)
    held = os.open(dev, os.O_RDONLY | os.O_EXCL)  # what a mount or device-mapper would hold
    try:
        refused(source, dev, "in use")
    finally:
        os.close(held)
    assert sha256_of(dev) == before


def test_a_mounted_block_device_is_refused(loop_device, source, tmp_path):
    dev = loop_device(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev],
                   check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro", dev, str(mnt)], check=True)
    try:
        before = sha256_of(dev)
        refused(source, dev, "in use")
        assert sha256_of(dev) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_filesystem_signature_is_refused_unless_forced(loop_device, source, tmp_path):
    dev = loop_device(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    before = sha256_of(dev)
    refused(source, dev, "holds a ext4 signature; pass --force")
    assert sha256_of(dev) == before
    p = run_cli("copy", source, dev, "--progress=none", "--force")
    assert p.returncode == 0, p.stderr
    compare(source, dev, size=8 * MiB)


def test_a_partition_table_in_a_file_is_refused(tmp_path, source):
    target = tmp_path / "disk.img"
    target.write_bytes(bytes(8 * MiB))
    subprocess.run(["sfdisk", "-q", str(target)], input="label: gpt\n,,L\n", text=True, check=True)
    before = sha256_of(str(target))
    refused(source, str(target), "holds a gpt signature")
    assert sha256_of(str(target)) == before


def test_an_nbd_target_with_a_boot_sector_is_refused(nbdkit, tmp_path, source):
    disk = tmp_path / "nbd-target.img"
    disk.write_bytes(bytes(510) + b"\x55\xaa" + bytes(8 * MiB - 512))
    dst = nbdkit("file", str(disk))
    refused(source, dst.uri, "boot sector")
    assert disk.read_bytes()[510:512] == b"\x55\xaa"


def test_read_only_and_unflushable_nbd_targets_are_refused(nbdkit, source):
    ro = nbdkit("memory", str(8 * MiB), readonly=True)
    refused(source, ro.uri, "read-only")
    full = nbdkit("full", str(8 * MiB))
    refused(source, full.uri, "cannot flush")


def test_library_raises_the_same_refusal(nbdkit, source):
    dst = nbdkit("memory", str(MiB))
    with pytest.raises(TargetRefused) as e:
        transfer.copy(source, dst.uri)
    assert e.value.exit_code == 2


def test_a_symlink_to_a_file_target_is_refused(tmp_path, source):
    """X7: open only what was named. A link to a file is refused (exit 2), the file untouched;
    a dangling link too, and nothing is created through it."""
    real = tmp_path / "real.img"
    real.write_bytes(b"\x5a" * (4 * MiB))
    link = tmp_path / "link.img"
    link.symlink_to(real)
    p = run_cli("copy", source, str(link))
    assert p.returncode == 2 and "symbolic link to a file" in p.stderr, p.stderr
    assert real.read_bytes() == b"\x5a" * (4 * MiB)
    dangling = tmp_path / "dangling.img"
    dangling.symlink_to(tmp_path / "nowhere" / "t.img")
    p = run_cli("copy", source, str(dangling))
    assert p.returncode == 2 and "dangling symbolic link" in p.stderr, p.stderr
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(TargetRefused, match="symbolic link"):
        transfer.copy(source, str(link))


def test_a_symlink_to_a_block_device_is_followed(loop_device, source, tmp_path):
    """X7: /dev/disk/by-id/... names are links to devices; those are opened (with O_EXCL)."""
    dev = loop_device(16 * MiB)
    link = tmp_path / "by-id-disk"
    link.symlink_to(dev)
    transfer.copy(source, str(link))
    assert transfer.verify(source, dev).equal


def test_an_empty_source_is_refused(nbdkit, tmp_path):
    """S9: 0 < size. A 0-byte export (exit 3, the server's answer is out of range) and a
    0-byte file (exit 2) are refused before a target is created."""
    from .conftest import run_cli

    empty = nbdkit("memory", "0", readonly=True)
    p = run_cli("copy", empty.uri, str(tmp_path / "a.img"))
    assert p.returncode == 3 and "export size 0 is out of range" in p.stderr, p.stderr
    f = tmp_path / "empty.img"
    f.touch()
    p = run_cli("copy", str(f), str(tmp_path / "b.img"))
    assert p.returncode == 2 and "the source is empty" in p.stderr, p.stderr
    assert not (tmp_path / "a.img").exists() and not (tmp_path / "b.img").exists()
