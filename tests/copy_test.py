"""End-to-end copies between real servers and real targets, each result proven independently.

Every copy is checked three ways: qemu-img compare (not strict: zero
detection makes targets sparser on purpose) with a size check, the report's
digest against one computed here with xxhash from the source's bytes (read
by qemu-img, not by the engine), and the report's byte accounting.
"""

from __future__ import annotations

import os
import subprocess

import pytest

import transfer
from transfer.demo.synth import make_image

from .conftest import compare, expected_digest_of_file, export_to_file

MiB = 1 << 20


# --- sources: each returns (uri, size) ---------------------------------------------------

def src_file(nbdkit, tmp_path, size):
    image = str(tmp_path / "synthetic.img")
    make_image(image, size, seed=size % 1000)
    return nbdkit("file", image, readonly=True).uri


def src_memory(nbdkit, tmp_path, size):
    return nbdkit("memory", str(size)).uri  # all zeroes, reported as a hole


def src_sparse_random(nbdkit, tmp_path, size):
    return nbdkit("sparse-random", f"size={size}", "seed=7", "percent=30", readonly=True).uri


def src_data(nbdkit, tmp_path, size):
    # bytes at odd places, a repeated run crossing 64 KiB blocks, the rest zero
    return nbdkit("data", "data=1 2 3 @0x1fff0 (0x55 0xaa)*70000 @0x300001 9", f"size={size}",
                  readonly=True).uri


def src_qcow2(qemu_nbd, tmp_path, size):
    """A qcow2 with data clusters, zero clusters (write -z) and unallocated holes."""
    image = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(size)], check=True)
    cmds = []
    for i, off in enumerate(range(0, size - MiB, 3 * MiB)):
        cmds += ["-c", f"write -P {0x11 + i % 200} {off} {MiB}"]
        if off + 2 * MiB <= size:
            cmds += ["-c", f"write -z {off + MiB} {MiB // 2}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, image], check=True, capture_output=True)
    return qemu_nbd(image).uri


SOURCES = {"file": src_file, "memory": src_memory, "sparse-random": src_sparse_random,
           "data": src_data, "qcow2": src_qcow2}


@pytest.fixture
def make_source(nbdkit, qemu_nbd, tmp_path):
    def make(kind, size):
        fn = SOURCES[kind]
        server = qemu_nbd if kind == "qcow2" else nbdkit
        uri = fn(server, tmp_path, size)
        reference = export_to_file(uri, str(tmp_path / "reference.raw"))
        assert os.path.getsize(reference) == size
        return uri, reference

    return make


# --- targets: each returns (address for the engine, address for qemu-img compare) ------

@pytest.fixture
def make_target(nbdkit, tmp_path, request):
    """Only a "loop" target asks for the loop_device fixture (root): the file, NBD and null:
    cases run as any user."""

    def make(kind, size):
        if kind == "new-file":
            path = str(tmp_path / "target.img")
            return path, path
        if kind == "old-file":  # existing, full of garbage: zero runs must really be zeroed
            path = str(tmp_path / "target.img")
            with open(path, "wb") as f:
                f.write(b"\xee" * size)
            return path, path
        if kind == "loop":
            dev = request.getfixturevalue("loop_device")(size, fill=b"\xee")
            return dev, dev
        if kind == "nbd":
            uri = nbdkit("memory", str(size)).uri
            return uri, uri
        if kind == "null":
            return "null:", None
        raise AssertionError(kind)

    return make


def check(report, reference, target_for_compare, size):
    assert report.size == size
    assert report.bytes_copied + report.bytes_zeroed + report.bytes_skipped == size
    assert report.digest == expected_digest_of_file(reference)
    if target_for_compare is not None:
        compare(reference, target_for_compare, size=size)


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("target", ["new-file", "old-file", "loop", "nbd", "null"])
def test_copy(make_source, make_target, source, target):
    size = 24 * MiB + 64 * 1024
    uri, reference = make_source(source, size)
    dst, cmp_target = make_target(target, size)
    report = transfer.copy(uri, dst)
    check(report, reference, cmp_target, size)
    assert report.flushed
    if target in ("old-file", "loop", "nbd") and source in ("memory", "data", "qcow2", "file"):
        assert report.bytes_zeroed > 0  # the garbage under zero runs had to go
    if target in ("new-file", "null"):
        assert report.bytes_zeroed == 0  # reads as zero already: skipped, not written


ODD = [1, 512, 64 * MiB + 512, 3 * MiB + 4097]


@pytest.mark.parametrize("size, target", [(size, target) for size in ODD
                                          for target in ("new-file", "loop", "nbd")
                                          if target != "loop" or size % 512 == 0])
def test_odd_sizes(make_source, make_target, size, target):
    uri, reference = make_source("data" if size > 0x300002 else "sparse-random", size)
    dst, cmp_target = make_target(target, size)
    check(transfer.copy(uri, dst, request_size=1 * MiB), reference, cmp_target, size)


def test_odd_size_onto_a_larger_block_device(make_source, loop_device):
    """The unaligned tail goes through the buffered descriptor; the device's tail is untouched."""
    size = 3 * MiB + 4097
    uri, reference = make_source("data", size)
    dev = loop_device(4 * MiB, fill=b"\xee")
    report = transfer.copy(uri, dev)
    assert report.target_size == 4 * MiB
    with open(dev, "rb") as d, open(reference, "rb") as r:
        assert d.read(size) == r.read()
        assert d.read() == b"\xee" * (4 * MiB - size)
    assert report.digest == expected_digest_of_file(reference)


@pytest.mark.parametrize("request_size", [64 * 1024, 192 * 1024, 2 * MiB])
def test_sizes_not_multiples_of_the_request_size(make_source, make_target, request_size):
    size = 5 * MiB + 3 * 64 * 1024 + 100
    uri, reference = make_source("file", size)
    dst, cmp_target = make_target("old-file", size)
    check(transfer.copy(uri, dst, request_size=request_size, in_flight=3, connections=3),
          reference, cmp_target, size)


@pytest.mark.slow
def test_one_gib_and_4097_bytes(nbdkit, tmp_path):
    size = (1 << 30) + 4097
    uri = nbdkit("sparse-random", f"size={size}", "seed=3", "percent=5", readonly=True).uri
    reference = export_to_file(uri, str(tmp_path / "reference.raw"))
    target = str(tmp_path / "target.img")
    report = transfer.copy(uri, target)
    check(report, reference, target, size)
    assert report.bytes_read < size // 5  # holes were not read


def test_local_file_source(tmp_path):
    """A regular file as the source: holes come from SEEK_DATA and are not read."""
    size = 16 * MiB + 4096
    image = str(tmp_path / "src.img")
    make_image(image, size, seed=5)
    report = transfer.copy(image, str(tmp_path / "a.img"))
    check(report, image, str(tmp_path / "a.img"), size)
    assert report.bytes_read < size  # holes were not read


def test_local_block_device_source(tmp_path, loop_device):
    """A block device as the source."""
    size = 16 * MiB + 4096
    image = str(tmp_path / "src.img")
    make_image(image, size, seed=5)
    dev = loop_device(size)
    with open(image, "rb") as f, open(dev, "r+b") as d:
        d.write(f.read())
    report = transfer.copy(dev, str(tmp_path / "b.img"))
    check(report, image, str(tmp_path / "b.img"), size)


def test_pure_python_twins_give_the_same_copy(make_source, tmp_path, monkeypatch):
    from transfer import _native
    from transfer._native import _reference

    calls, real = [], _reference.fallocate
    monkeypatch.setattr(_native, "_loaded", {})  # load the twins afresh, with the counting one
    monkeypatch.setattr(_reference, "fallocate", lambda *a: (calls.append(a), real(*a)))
    uri, reference = make_source("file", 6 * MiB + 100)
    garbage = tmp_path / "a.img"
    garbage.write_bytes(b"\xee" * (6 * MiB + 100))  # zero runs must be punched: fileops run
    monkeypatch.delenv("TRANSFER_NATIVE", raising=False)
    a = transfer.copy(uri, str(garbage), native="python")
    assert calls  # the twin did the punching, as the report says, though the default is cython
    check(a, reference, str(garbage), 6 * MiB + 100)
    b = transfer.copy(uri, str(tmp_path / "b.img"), native="cython")
    assert a.native == {"zeroscan": "python", "blockhash": "python", "fileops": "python",
                        "intervals": "python", "blockstatus": "python"}
    assert b.native == {"zeroscan": "cython", "blockhash": "cython", "fileops": "cython",
                        "intervals": "cython", "blockstatus": "cython"}
    assert a.digest == b.digest == expected_digest_of_file(reference)


def test_async_api_inside_a_running_loop(make_source, tmp_path):
    """copy_async() runs on the caller's loop; progress events arrive and end with a final one."""
    import asyncio

    uri, reference = make_source("file", 8 * MiB)
    events = []

    async def main():
        ticker_ran = []

        async def ticker():  # the caller's loop stays responsive during the copy
            while True:
                ticker_ran.append(1)
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        report = await transfer.copy_async(uri, str(tmp_path / "t.img"), on_progress=events.append)
        t.cancel()
        return report, ticker_ran

    report, ticker_ran = asyncio.run(main())
    check(report, reference, str(tmp_path / "t.img"), 8 * MiB)
    assert ticker_ran
    assert events[-1].final and events[-1].done == events[-1].total == 8 * MiB


def test_an_existing_sparse_file_reads_as_zero(make_source, tmp_path):
    """A fresh sparse disk.img (no data at all) gets no zeroing; one byte of data changes that."""
    uri, reference = make_source("data", 8 * MiB)
    target = tmp_path / "disk.img"
    with open(target, "wb") as f:
        f.truncate(8 * MiB)
    report = transfer.copy(uri, str(target))
    assert not report.target_created
    assert report.bytes_zeroed == 0 and report.bytes_skipped > 0
    check(report, reference, str(target), 8 * MiB)
    with open(target, "r+b") as f:  # now it holds data: zero runs must be written
        f.seek(7 * MiB)
        f.write(b"\x01")
    report = transfer.copy(uri, str(target))
    assert report.bytes_zeroed > 0 and report.bytes_skipped == 0
    check(report, reference, str(target), 8 * MiB)


def test_zero_buffers_only_when_the_target_cannot_zero(make_source, nbdkit):
    """nbdkit's nozero filter takes zeroing away: zero runs then go as written zero buffers."""
    size = 8 * MiB
    uri, reference = make_source("data", size)
    dst = nbdkit("memory", str(size), "zeromode=none", filters=["nozero"])
    report = transfer.copy(uri, dst.uri)
    assert report.zero_method == "write" and report.bytes_zeroed > 0
    check(report, reference, dst.uri, size)
    dst2 = nbdkit("memory", str(size))
    assert transfer.copy(uri, dst2.uri).zero_method == "nbd-zero"
