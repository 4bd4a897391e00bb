# cython: language_level=3
"""System calls the standard library lacks, run without the GIL.

fallocate(2) with a mode (punch hole, zero range), sync_file_range(2), and
the block-device ioctls BLKZEROOUT and BLKSSZGET. They can take long on a large range, so the
GIL is released around each call.

Pure-Python twins (ctypes and fcntl): transfer._native._reference.
"""

from libc.errno cimport errno
from libc.stdint cimport uint64_t

cdef extern from "<fcntl.h>" nogil:
    int c_fallocate "fallocate" (int fd, int mode, long long offset, long long length)
    int c_sync_file_range "sync_file_range" (int fd, long long offset, long long nbytes,
                                             unsigned int flags)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/fs.h>":
    unsigned long BLKZEROOUT
    unsigned long BLKSSZGET


def fallocate(int fd, int mode, long long offset, long long length):
    """fallocate(2); raises OSError with the errno on failure."""
    cdef int rc, err = 0
    with nogil:
        rc = c_fallocate(fd, mode, offset, length)
        if rc != 0:
            err = errno
    if rc != 0:
        raise OSError(err, "fallocate failed")


def sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags):
    """sync_file_range(2); raises OSError with the errno on failure."""
    cdef int rc, err = 0
    with nogil:
        rc = c_sync_file_range(fd, offset, nbytes, flags)
        if rc != 0:
            err = errno
    if rc != 0:
        raise OSError(err, "sync_file_range failed")


def blkzeroout(int fd, uint64_t offset, uint64_t length):
    """ioctl(BLKZEROOUT): zero a range of a block device; raises OSError."""
    cdef uint64_t rng[2]
    cdef int rc, err = 0
    rng[0] = offset
    rng[1] = length
    with nogil:
        rc = ioctl(fd, BLKZEROOUT, rng)
        if rc != 0:
            err = errno
    if rc != 0:
        raise OSError(err, "BLKZEROOUT failed")


def blksszget(int fd):
    """ioctl(BLKSSZGET): the logical sector size of a block device."""
    cdef int size = 0
    if ioctl(fd, BLKSSZGET, &size) != 0:
        raise OSError(errno, "BLKSSZGET failed")
    return size
