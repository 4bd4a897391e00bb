# cython: language_level=3
"""Block status with the reply read in C, so its size costs no Python objects.

libnbd's Python binding turns a block status reply into one Python list of
every entry before the callback sees it: a server may send 8,000,000
descriptors in one reply (a 64 MiB chunk, which libnbd accepts), and that
list cost 343-590 MiB here (RELIABILITY.md S8). This kernel calls
nbd_block_status() of the C library on the handle that the Python binding
wraps (the capsule "nbd_handle" in NBD._o), with a C callback that reads the
reply in place: extents are clipped at the end of the request, runs with the
same flags merged, and at most `cap` extents kept; a reply with more is cut
there and the caller treats the rest as unknown. The GIL is released for the
whole call. What libnbd itself holds of the reply (8 bytes per descriptor,
64 MiB at most) is freed when the call returns.

Pure-Python twin: transfer._native._reference.block_status (the binding's
list, then the same algorithm).
"""

from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport strcmp

cdef extern from "<libnbd.h>" nogil:
    cdef struct nbd_handle:
        pass
    ctypedef int (*extent_fn)(void *user_data, const char *metacontext, uint64_t offset,
                              uint32_t *entries, size_t nr_entries, int *error) noexcept nogil
    ctypedef void (*free_fn)(void *user_data) noexcept nogil
    ctypedef struct nbd_extent_callback:
        extent_fn callback
        void *user_data
        free_fn free
    int nbd_block_status(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_extent_callback extent_callback, uint32_t flags)
    const char *nbd_get_error()
    int nbd_get_errno()

# What block_status() returns first: the reply was usable, or why not.
cdef enum:
    C_OK = 0
    C_NO_REPLY = 1  # no reply for this context at this offset (libnbd: "not called at all")
    C_ODD = 2  # an odd number of entries
    C_ZERO_LENGTH = 3  # an extent of length 0 (at the offset returned third)

OK, NO_REPLY, ODD, ZERO_LENGTH = C_OK, C_NO_REPLY, C_ODD, C_ZERO_LENGTH


cdef struct Reply:
    const char *context
    uint64_t offset
    uint64_t end
    uint64_t pos
    int64_t *out  # (offset, length, flags) triples
    size_t n
    size_t cap
    int seen
    int status
    int truncated


cdef int on_extents(void *user_data, const char *metacontext, uint64_t offset,
                    uint32_t *entries, size_t nr_entries, int *error) noexcept nogil:
    cdef Reply *r = <Reply *>user_data
    cdef size_t i
    cdef uint64_t length, flags
    if r.seen or offset != r.offset or strcmp(metacontext, r.context) != 0:
        return 0  # another context, or a second reply for ours: only the first counts
    r.seen = 1
    if nr_entries % 2:
        r.status = C_ODD
        return 0
    i = 0
    while i < nr_entries:
        length = entries[i]
        flags = entries[i + 1]
        i += 2
        if length == 0:
            r.status = C_ZERO_LENGTH
            return 0
        if length > r.end - r.pos:
            length = r.end - r.pos
        if r.n and <uint64_t>r.out[3 * r.n - 1] == flags:
            r.out[3 * r.n - 2] += length
        elif r.n == r.cap:
            r.truncated = 1
            return 0
        else:
            r.out[3 * r.n] = r.pos
            r.out[3 * r.n + 1] = length
            r.out[3 * r.n + 2] = flags
            r.n += 1
        r.pos += length
        if r.pos >= r.end:
            break
    return 0


def block_status(handle, str context, uint64_t offset, uint64_t length, size_t cap):
    """Block status of [offset, +length) for one metadata context on a connected nbd.NBD.

    Returns (status, extents, pos, truncated): status OK with the extents as
    (offset, length, flags) tuples, clipped at offset + length and merged, at
    most cap of them (truncated: the reply went on past the cap, and what
    follows pos is unknown); NO_REPLY; ODD; or ZERO_LENGTH at pos. A failed
    request raises OSError with libnbd's errno and message.
    """
    if cap < 1 or length < 1:
        raise ValueError("cap and length must be positive")
    cdef nbd_handle *h = <nbd_handle *>PyCapsule_GetPointer(handle._o, "nbd_handle")
    cdef bytes name = context.encode()
    cdef Reply r
    r.context = name
    r.offset = offset
    r.end = offset + length
    r.pos = offset
    r.n = 0
    r.cap = cap
    r.seen = 0
    r.status = C_OK
    r.truncated = 0
    r.out = <int64_t *>malloc(3 * cap * sizeof(int64_t))
    if r.out == NULL:
        raise MemoryError()
    cdef nbd_extent_callback cb
    cb.callback = on_extents
    cb.user_data = &r
    cb.free = NULL
    cdef int rc, err = 0
    cdef bytes message = b""
    try:
        with nogil:
            rc = nbd_block_status(h, length, offset, cb, 0)
            if rc == -1:
                err = nbd_get_errno()
        if rc == -1:
            message = nbd_get_error() or b"block status failed"
            raise OSError(err, message.decode(errors="replace"))
        if not r.seen:
            return C_NO_REPLY, [], offset, False
        if r.status != C_OK:
            return r.status, [], r.pos, False
        return C_OK, [(r.out[3 * i], r.out[3 * i + 1], r.out[3 * i + 2]) for i in range(r.n)], \
            r.pos, bool(r.truncated)
    finally:
        free(r.out)
