# cython: language_level=3
"""Zero scan: which fixed-size blocks of a buffer are all zero bytes.

The pipeline calls this on every buffer it reads, so that zero runs inside
allocated data are not written as data. The loop runs without the GIL; the
check is glibc's vectorised memcmp of the block against itself shifted by 16
bytes, once the first 16 bytes are known to be zero (if p[0:16] == 0 and
p[i] == p[i+16] for all i, every byte is zero).

Pure-Python twin: transfer._native._reference.zero_blocks.
"""

from libc.stdint cimport uint8_t
from libc.string cimport memcmp


cdef inline bint _is_zero(const uint8_t *p, size_t n) noexcept nogil:
    cdef size_t i
    cdef size_t head = 16 if n > 16 else n
    for i in range(head):
        if p[i]:
            return False
    if n <= 16:
        return True
    return memcmp(p, p + 16, n - 16) == 0


def zero_blocks(const uint8_t[::1] buf, Py_ssize_t block_size, uint8_t[::1] out):
    """Set out[i] = 1 where block i of buf is all zero, else 0; return the zero count.

    Blocks are block_size bytes; the last one may be shorter. out must hold at
    least ceil(len(buf) / block_size) bytes.
    """
    cdef Py_ssize_t n = buf.shape[0]
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    cdef Py_ssize_t nblocks = (n + block_size - 1) // block_size
    if out.shape[0] < nblocks:
        raise ValueError(f"out holds {out.shape[0]} flags, {nblocks} needed")
    cdef Py_ssize_t i, start, length, zeros = 0
    cdef const uint8_t *p = &buf[0] if n else NULL
    with nogil:
        for i in range(nblocks):
            start = i * block_size
            length = block_size if n - start > block_size else n - start
            if _is_zero(p + start, <size_t>length):
                out[i] = 1
                zeros += 1
            else:
                out[i] = 0
    return zeros
