# cython: language_level=3
"""Interval algebra over runs: lists of (start, end) pairs of byte offsets.

A warm pass plans with these (transfer/tracking/areas.py, transfer/state/sync.py): the changed
areas merged into runs, the last pass's plan clipped where it stopped, what is new subtracted,
the union copied. 100,000 changed areas made these the planning's hot loop in plain Python
(bench kernels: the numpy baseline was 6-9x faster, but importing numpy costs a pass ~60 ms).
Here the pairs are copied into a C array of int64, sorted with qsort, swept, and copied out.
Most of the time goes to Python objects at the two ends, so an output pair equal to an input
tuple is that tuple, not a new one (tuples are immutable: the twin's answer compares equal).

The domain is what the engine passes: offsets in [0, 2**63) and a positive block. There every
input, sorted or not, overlapping or not, gives what the twin gives (tests/native_test.py proves
it on random inputs). Outside it these raise where the twins may compute: ValueError for a
negative offset or a block below 1, OverflowError for an offset of 2**63 or more.

Pure-Python twins: transfer._native._reference.merge_runs, subtract_runs, clip_runs, runs_bytes.
"""

cimport cython
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc, qsort, realloc


cdef struct Run:
    int64_t s
    int64_t e
    Py_ssize_t i  # the input tuple with exactly these values, or -1


cdef int _order(const void *a, const void *b) noexcept nogil:
    # As Python sorts (start, end) tuples: by start, then end.
    cdef const Run *x = <const Run *>a
    cdef const Run *y = <const Run *>b
    if x.s != y.s:
        return -1 if x.s < y.s else 1
    if x.e != y.e:
        return -1 if x.e < y.e else 1
    return 0


cdef list _seq(object runs):
    # A copy even of a list (of pointers: cheap): unpacking an item may run Python code, which
    # must not be able to shrink what the indices in Run.i point into.
    return list(runs)


cdef Run *_load(list seq) except NULL:
    """The pairs of seq (2-item sequences of offsets in [0, 2**63)) in a new C array."""
    cdef Py_ssize_t n = len(seq), i
    cdef Run *buf = <Run *>malloc((n + 1) * sizeof(Run))
    if buf == NULL:
        raise MemoryError()
    cdef int64_t s, e
    cdef object item
    try:
        for i in range(n):
            item = seq[i]
            s, e = item
            if s < 0 or e < 0:
                raise ValueError(f"negative offset in run {item!r}")
            buf[i].s = s
            buf[i].e = e
            buf[i].i = i if type(item) is tuple else -1
    except BaseException:
        free(buf)
        raise
    return buf


cdef Run *_room(Run *buf, Py_ssize_t *cap, Py_ssize_t m) except NULL:
    """buf with room for run m: grown (doubled) when full. On failure buf is left as it was,
    still the caller's to free."""
    cdef Run *grown
    if m < cap[0]:
        return buf
    grown = <Run *>realloc(buf, 2 * cap[0] * sizeof(Run))
    if grown == NULL:
        raise MemoryError()
    cap[0] *= 2
    return grown


cdef list _pairs(const Run *buf, Py_ssize_t n, list seq):
    cdef list out = [None] * n
    cdef Py_ssize_t k
    for k in range(n):
        if buf[k].i >= 0:
            out[k] = seq[buf[k].i]
        else:
            out[k] = (buf[k].s, buf[k].e)
    return out


@cython.cdivision(False)
def merge_runs(runs, int64_t size, int64_t block=65536):
    """[start, end) runs in any order -> sorted, merged, rounded outward to block, clipped."""
    if block < 1:
        raise ValueError(f"block is {block}, not a positive size")
    cdef list seq = _seq(runs)
    cdef Py_ssize_t n = len(seq), i, m = 0
    cdef Run *buf = _load(seq)
    cdef int64_t s, e
    try:
        for i in range(n):
            s = buf[i].s - buf[i].s % block
            if buf[i].e > 0x7FFFFFFFFFFFFFFF - (block - 1):
                e = size  # rounded up it would pass 2**63 - 1, which no size reaches
            else:
                e = -(-buf[i].e // block) * block
                if e > size:
                    e = size
            if s != buf[i].s or e != buf[i].e:
                buf[i].s, buf[i].e, buf[i].i = s, e, -1
        qsort(buf, n, sizeof(Run), _order)
        for i in range(n):
            if m and buf[i].s <= buf[m - 1].e:
                if buf[i].e > buf[m - 1].e:
                    buf[m - 1].e = buf[i].e
                    buf[m - 1].i = -1
            else:
                buf[m] = buf[i]
                m += 1
        return _pairs(buf, m, seq)
    finally:
        free(buf)


def subtract_runs(a, b):
    """Runs of a not covered by b (both sorted and disjoint)."""
    cdef list sa = _seq(a), sb = _seq(b)
    cdef Py_ssize_t na = len(sa), nb = len(sb), i, j = 0, k, m = 0
    cdef Run *ra = _load(sa)
    cdef Run *rb = NULL
    cdef Run *out = NULL
    cdef Py_ssize_t cap = na + nb + 1
    cdef int64_t s, e
    try:
        rb = _load(sb)
        # Sorted, disjoint runs of a give at most na + nb pieces; overlapping ones (outside the
        # contract, but the twin takes them) may give more, so the array grows when full.
        out = <Run *>malloc(cap * sizeof(Run))
        if out == NULL:
            raise MemoryError()
        for i in range(na):
            s = ra[i].s
            e = ra[i].e
            while j < nb and rb[j].e <= s:
                j += 1
            k = j
            while s < e:
                if k >= nb or rb[k].s >= e:
                    out = _room(out, &cap, m)
                    out[m].s = s
                    out[m].e = e
                    out[m].i = ra[i].i if s == ra[i].s else -1  # untouched: a's own tuple
                    m += 1
                    break
                if rb[k].s > s:
                    out = _room(out, &cap, m)
                    out[m].s = s
                    out[m].e = rb[k].s
                    out[m].i = -1
                    m += 1
                if rb[k].e > s:
                    s = rb[k].e
                k += 1
        return _pairs(out, m, sa)
    finally:
        free(ra)
        free(rb)
        free(out)


def clip_runs(a, int64_t start, int64_t end):
    """The parts of runs a inside [start, end)."""
    cdef list seq = _seq(a)
    cdef Py_ssize_t n = len(seq), i, m = 0
    cdef Run *buf = _load(seq)
    cdef int64_t s, e
    try:
        for i in range(n):
            s = buf[i].s if buf[i].s > start else start
            e = buf[i].e if buf[i].e < end else end
            if s < e:
                buf[m].i = buf[i].i if s == buf[i].s and e == buf[i].e else -1
                buf[m].s = s
                buf[m].e = e
                m += 1
        return _pairs(buf, m, seq)
    finally:
        free(buf)


def runs_bytes(a):
    """The bytes the runs cover (the sum of end - start)."""
    cdef list seq = _seq(a)
    cdef Py_ssize_t n = len(seq), i
    cdef Run *buf = _load(seq)
    cdef object total = 0
    cdef int64_t part = 0, d
    try:
        for i in range(n):
            d = buf[i].e - buf[i].s
            # Any one disk's runs add up within int64, arbitrary pairs need not: carry into a
            # Python int before a step would overflow, so the twin's answer is always given.
            if ((d > 0 and part > 0x7FFFFFFFFFFFFFFF - d)
                    or (d < 0 and part < -0x7FFFFFFFFFFFFFFF - d)):
                total += part
                part = 0
            part += d
        return total + part
    finally:
        free(buf)
