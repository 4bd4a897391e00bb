"""Digests, checksum, verify (the conversion type), copy --verify and manifest files."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import transfer
from transfer.integrity import Manifest, ManifestError

from .conftest import expected_digest_of_file, export_to_file, run_cli

MiB = 1 << 20
K64 = 64 * 1024


def checksum_cli(disk: str) -> str:
    p = run_cli("checksum", disk, "--progress=none")
    assert p.returncode == 0, p.stderr
    digest, name = p.stdout.split()
    return digest


@pytest.mark.parametrize("size", [1, K64 - 1, K64, K64 + 1, 5 * MiB + 4097])
def test_digest_of_odd_sizes_is_the_spec(nbdkit, tmp_path, size):
    uri = nbdkit("sparse-random", f"size={size}", "seed=11", "percent=40", readonly=True).uri
    raw = export_to_file(uri, str(tmp_path / "raw"))
    assert checksum_cli(uri) == expected_digest_of_file(raw)
    assert checksum_cli(raw) == expected_digest_of_file(raw)


@pytest.mark.slow
def test_digest_of_one_gib_and_4097_bytes(nbdkit, tmp_path):
    size = (1 << 30) + 4097
    uri = nbdkit("sparse-random", f"size={size}", "seed=5", "percent=3", readonly=True).uri
    raw = export_to_file(uri, str(tmp_path / "raw"))
    r = transfer.checksum(uri)
    assert r.digest == expected_digest_of_file(raw)
    assert r.bytes_read < size // 10  # holes are hashed without reading


def test_raw_qcow2_and_block_device_give_one_digest(nbdkit, qemu_nbd, loop_device, tmp_path):
    raw = str(tmp_path / "disk.raw")
    with open(raw, "wb") as f:  # data, a hole, allocated zeros, data, a hole at the end
        f.write(os.urandom(3 * MiB))
        f.seek(5 * MiB)
        f.write(bytes(MiB))
        f.write(os.urandom(MiB + 512))
        f.truncate(12 * MiB)
    qcow2 = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    # an explicit zero cluster where the raw image has allocated zeros
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -z {5 * MiB} {MiB}", qcow2], check=True,
                   capture_output=True)
    dev = loop_device(12 * MiB)
    with open(raw, "rb") as f, open(dev, "r+b") as d:
        d.write(f.read())
    expected = expected_digest_of_file(raw)
    assert checksum_cli(nbdkit("file", raw, readonly=True).uri) == expected
    assert checksum_cli(qemu_nbd(qcow2).uri) == expected
    assert checksum_cli(dev) == expected
    assert checksum_cli(raw) == expected


def test_checksum_json(tmp_path):
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(8 * MiB)
    p = run_cli("checksum", str(disk), "--json", "--progress=json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)  # stdout holds the object alone; progress went to stderr
    assert r["digest"] == expected_digest_of_file(str(disk))
    assert r["size"] == 8 * MiB and r["bytes_read"] == MiB
    last = json.loads(p.stderr.splitlines()[-1])
    assert last["final"] and last["bytes_done"] == last["bytes_total"] == 8 * MiB


def test_flipped_byte_under_a_loop_device_is_found_at_its_offset(loop_device, tmp_path):
    """The page cache above the loop device still holds the old byte; verify reads past it."""
    source = str(tmp_path / "src.img")
    with open(source, "wb") as f:
        f.write(os.urandom(8 * MiB))
    dev = loop_device(8 * MiB)
    backing = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", dev], capture_output=True,
                             text=True, check=True).stdout.strip()
    report = transfer.copy(source, dev, verify=True)
    assert report.verified
    flip = 5 * MiB + 12345
    # Hold the device open: its page cache is dropped when the last opener closes it.
    with open(dev, "rb", buffering=0) as held:
        assert len(held.read(8 * MiB)) == 8 * MiB  # the page cache above the loop device is full
        with open(backing, "r+b") as b:
            b.seek(flip)
            old = b.read(1)
            b.seek(flip)
            b.write(bytes([old[0] ^ 0xFF]))
        held.seek(flip)
        assert held.read(1) == old  # the cache still shows the old byte
        p = run_cli("verify", source, dev, "--progress=none")
        assert p.returncode == 6, p.stdout + p.stderr
        block = flip - flip % K64
        assert "1 of 128 blocks of 64 KiB differ" in p.stdout and f"offsets {block}" in p.stdout
        p = run_cli("verify", source, dev, "--json", "--progress=none")
        r = json.loads(p.stdout)
        assert (r["equal"], r["differing_blocks"], r["first_differences"]) == (False, 1, [block])
        p = run_cli("verify", dev, "--expect", report.digest, "--progress=none")
        assert p.returncode == 6 and "DIFFER" in p.stdout
        p = run_cli("checksum", dev, "--progress=none")
        assert p.stdout.split()[0] != report.digest


def test_copy_verify_catches_a_target_that_lies(nbdkit, tmp_path):
    """An NBD target that corrupts one byte of what it is given: --verify exits 6 naming it."""
    source, store = str(tmp_path / "src.img"), str(tmp_path / "store.img")
    with open(source, "wb") as f:
        f.write(os.urandom(8 * MiB))
    with open(store, "wb") as f:
        f.truncate(8 * MiB)
    bad = 3_000_000
    pwrite = (f"dd of={store} seek=$4 count=$3 oflag=seek_bytes iflag=count_bytes conv=notrunc "
              f"status=none; if [ $4 -le {bad} ] && [ $(($4+$3)) -gt {bad} ]; then printf Z | "
              f"dd of={store} seek={bad} oflag=seek_bytes conv=notrunc status=none; fi")
    dst = nbdkit("eval", f"get_size=echo {8 * MiB}", f"pwrite={pwrite}", "can_write=exit 0",
                 "can_flush=exit 0", "flush=exit 0",
                 f"pread=dd if={store} skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none")
    p = run_cli("copy", source, dst.uri, "--verify", "--progress=none")
    assert p.returncode == 6, p.stderr
    assert f"at offset {bad - bad % K64}" in p.stderr and "Traceback" not in p.stderr
    # without --verify the same copy claims success: the check is what catches it
    assert run_cli("copy", source, dst.uri, "--progress=none").returncode == 0


@pytest.mark.parametrize("target", ["file", "loop"])
def test_copy_verify_reads_back_at_most_the_allocated_data(nbdkit, loop_device, tmp_path, target):
    image = str(tmp_path / "src.img")
    with open(image, "wb") as f:
        f.write(os.urandom(2 * MiB))
        f.seek(20 * MiB)
        f.write(os.urandom(MiB) + bytes(MiB))  # data, then allocated zeros
        f.truncate(32 * MiB)
    src = nbdkit("file", image, readonly=True)
    dst = str(tmp_path / "t.img") if target == "file" else loop_device(32 * MiB, fill=b"\xee")
    report = transfer.copy(src.uri, dst, verify=True)
    assert report.verified and report.digest == expected_digest_of_file(image)
    assert report.bytes_read == 4 * MiB
    assert report.verify_bytes_read == 3 * MiB  # what was written as data, and nothing else


def test_verify_ignores_allocation(tmp_path):
    sparse, full = str(tmp_path / "sparse.img"), str(tmp_path / "full.img")
    data = os.urandom(MiB)
    with open(sparse, "wb") as f:
        f.write(data)
        f.truncate(16 * MiB)
    with open(full, "wb") as f:
        f.write(data + bytes(15 * MiB))
    r = transfer.verify(sparse, full)
    assert r.equal and r.differing_blocks == 0 and r.source_digest == r.target_digest
    assert run_cli("verify", sparse, full, "--progress=none").returncode == 0


def test_verify_over_the_source_size_and_smaller_targets(tmp_path):
    a, big, small = (str(tmp_path / n) for n in ("a.img", "big.img", "small.img"))
    data = os.urandom(3 * MiB)
    for path, size in ((a, 3 * MiB), (big, 4 * MiB), (small, 2 * MiB)):
        with open(path, "wb") as f:
            f.write(data[:size])
            f.truncate(size)
    r = transfer.verify(a, big)
    assert r.equal and r.target_size == 4 * MiB  # a PVC larger than the disk
    p = run_cli("verify", a, small, "--progress=none")
    assert p.returncode == 6 and "smaller than the source" in p.stderr


def test_verify_bad_input():
    p = run_cli("verify", "/nonexistent-a", "/nonexistent-b")
    assert p.returncode == 2
    p = run_cli("verify", "/dev/null", "--expect", "sha256:abc")
    assert p.returncode == 2 and "not a digest" in p.stderr
    p = run_cli("verify", "a", "b", "--expect", "xxh3-128:64k:" + "0" * 32)
    assert p.returncode == 2 and "verify takes" in p.stderr


def test_manifest_file_round_trip_and_validation(tmp_path):
    image = str(tmp_path / "src.img")
    with open(image, "wb") as f:
        f.write(os.urandom(MiB + 100))
    path = str(tmp_path / "m.manifest")
    report = transfer.copy(image, str(tmp_path / "t.img"), manifest=path)
    assert not os.path.exists(path + ".tmp")
    m = Manifest.open(path)
    try:
        assert m.size == MiB + 100 and m.blocks == 17
        assert m.digest_string() == report.digest == expected_digest_of_file(image)
    finally:
        m.close()
    assert transfer.checksum(image, manifest=str(tmp_path / "c.manifest")).digest == report.digest
    assert open(path, "rb").read() == open(tmp_path / "c.manifest", "rb").read()

    good = open(path, "rb").read()
    cases = {
        "wrong magic": b"X" + good[1:],
        "header checksum": good[:20] + bytes([good[20] ^ 1]) + good[21:],
        "bytes, expected": good[:-1],
        "shorter than its header": good[:10],
    }
    for why, content in cases.items():
        bad = tmp_path / "bad.manifest"
        bad.write_bytes(content)
        with pytest.raises(ManifestError, match=why):
            Manifest.open(str(bad))


# --- the manifest's own storage (RELIABILITY.md T9, R6) ------------------------------------------

from transfer.errors import BadInput, StateIOError  # noqa: E402

from .statefs_test import failing_fs, tmpfs  # noqa: E402,F401  (fixtures)


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_file_manifest_is_preallocated(tmp_path):
    """Stores into the map must never need a block (on a full file system that is SIGBUS):
    a created manifest, and a sparse one opened for writing, have every byte allocated."""
    size = 64 * MiB
    length = 64 + size // K64 * 16
    m = Manifest.create(str(tmp_path / "m"), size)
    try:
        assert _allocated(tmp_path / "m.tmp") >= length
        m.save()
    finally:
        m.close()
    sparse = tmp_path / "sparse"
    with open(tmp_path / "m", "rb") as f:
        header = f.read(64)
    with open(sparse, "wb") as f:  # the same manifest written sparse (all-zero digests)
        f.write(header)
        f.truncate(length)
    assert _allocated(sparse) < length
    Manifest.open(str(sparse)).close()  # read-only: left as it is
    assert _allocated(sparse) < length
    m = Manifest.open(str(sparse), writable=True)
    try:
        assert _allocated(sparse) >= length and m.size == size
    finally:
        m.close()


def test_no_space_for_a_manifest_is_a_state_io_error(tmpfs):
    """An 8 KiB tmpfs cannot hold a 32 MiB disk's manifest (8 KiB + header): creating it
    fails at once, with exit 4 (not bad input) and no temp file left to keep the space."""
    fs = tmpfs("8k")
    with pytest.raises(StateIOError, match="No space left on device") as e:
        Manifest.create(str(fs / "manifest"), 32 * MiB)
    assert e.value.exit_code == 4 and not isinstance(e.value, BadInput)
    assert "8256 bytes" in str(e.value)
    assert os.listdir(fs) == []


def test_an_msync_eio_is_a_state_io_error(failing_fs):
    """EIO under the manifest's file (ext2 on loop on nbdfuse on nbdkit's error filter):
    msync fails with StateIOError (exit 4), never a traceback or a silent success."""
    mnt, inject, _ = failing_fs
    m = Manifest.create(str(mnt / "manifest"), 8 * MiB)
    try:
        m.save()
        m.slice(0, 8 * MiB)[:] = b"\x5a" * (8 * MiB // K64 * 16)
        inject.touch()
        with pytest.raises(StateIOError, match="msync failed: Input/output error") as e:
            m.sync()
        assert e.value.exit_code == 4
    finally:
        inject.unlink(missing_ok=True)
        m.close()


def test_runs_of_finds_whole_digest_slots_only():
    """Manifest.runs_of (the blocks a read-back found wrong): adjacent blocks merge into one run,
    the short last block's run ends at the size, and bytes that straddle two digest slots (the
    tail of one digest and the head of the next) are no block's digest."""
    m = Manifest(10 * 65536 + 100)
    poison = b"\xff" * 16
    for i in (0, 1, 3, 10):
        m.slice(i * 65536, 1)[:] = poison
    m.slice(5 * 65536, 1)[:] = bytes(8) + b"\xff" * 8
    m.slice(6 * 65536, 1)[:] = b"\xff" * 8 + bytes(8)
    assert m.runs_of(poison) == [(0, 2 * 65536), (3 * 65536, 4 * 65536),
                                 (10 * 65536, 10 * 65536 + 100)]
    assert Manifest(65536).runs_of(poison) == []
    m.close()
