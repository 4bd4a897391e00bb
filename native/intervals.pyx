# cython: language_level=3
"""Interval algebra over runs: [start, end) pairs of byte offsets, held as transfer.runs.Runs.

A warm pass plans with these (transfer/tracking/areas.py, transfer/migration/passplan.py): the
changed areas merged into runs, the last pass's plan clipped where it stopped, what is new
subtracted, the union copied. 100,000 changed areas made these the planning's hot loop in plain
Python; as lists of tuples converted in and out on every call, the compiled kernels were still
slower than numpy (bench kernels), whose import costs a pass ~60 ms. So a Runs is one flat int64
array, [s0, e0, s1, e1, ...]: a kernel reads it through a typed memoryview (which also keeps it
from being resized while read), runs its loops without the GIL, and returns a new Runs. A plain
iterable of pairs is taken too, converted once here, at the edge.

The domain is what the engine passes: offsets in [0, 2**63) and a positive block. There every
input, sorted or not, overlapping or not, gives what the twin gives (tests/native_test.py proves
it on random inputs). Outside it these raise where the twins may compute: ValueError for a
negative offset or a block below 1, OverflowError for an offset of 2**63 or more. Offsets are
checked non-negative and the block positive before any arithmetic, so C division (cdivision, in
setup.py) rounds as Python's does.

Pure-Python twins: transfer._native._reference.merge_runs, subtract_runs, clip_runs, runs_bytes.
"""

from cpython cimport array
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

import array as _array  # cpython.array's clone needs a template of the type code

from transfer.runs import TYPECODE, Runs, wrap

cdef array.array _TEMPLATE = _array.array(TYPECODE)
cdef int64_t _TOP = 0x7FFFFFFFFFFFFFFF
cdef uint64_t _SIGN = 1ULL << 63


cdef struct Run:  # two consecutive items of a Runs' flat array
    int64_t s
    int64_t e


cdef inline uint64_t _digit(const Run *r, int p) noexcept nogil:
    """Digit p of r's sort key: p 0-7 the bytes of e, 8-15 those of s, low to high, with the
    sign bit flipped so that unsigned order is int64 order."""
    cdef uint64_t x = <uint64_t>(r.e if p < 8 else r.s) ^ _SIGN
    return (x >> (8 * (p & 7))) & 0xFF


cdef int _sort(Run *buf, Py_ssize_t n) noexcept nogil:
    """Sort buf (n >= 1 runs) as Python sorts (start, end) tuples: by start, then end. 0, or -1
    when out of memory. An LSD radix sort, a byte a pass, e's bytes then s's (each pass stable), a pass
    skipped when all runs share its byte (the high bytes of offsets on a disk, the low ones of
    block-aligned runs): a few linear passes where qsort's calls through a pointer were most
    of a merge (bench kernels)."""
    cdef size_t counts[16][256]
    cdef size_t at, c
    cdef Py_ssize_t i
    cdef int p, d
    cdef Run *src = buf
    cdef Run *dst
    cdef Run *swap
    cdef Run *tmp = <Run *>malloc((n + 1) * sizeof(Run))
    if tmp == NULL:
        return -1
    dst = tmp
    memset(counts, 0, sizeof(counts))
    for i in range(n):
        for p in range(16):
            counts[p][_digit(&buf[i], p)] += 1
    for p in range(16):
        if counts[p][_digit(&buf[0], p)] == <size_t>n:
            continue  # every run has this byte: the pass would move nothing
        at = 0
        for d in range(256):
            c = counts[p][d]
            counts[p][d] = at
            at += c
        for i in range(n):
            d = <int>_digit(&src[i], p)
            dst[counts[p][d]] = src[i]
            counts[p][d] += 1
        swap = src
        src = dst
        dst = swap
    if src != buf:
        memcpy(buf, src, n * sizeof(Run))
    free(tmp)
    return 0


cdef array.array _flat(object runs):
    """The int64 array of runs: a Runs' own (checked non-negative), else the pairs of an iterable
    (2-item sequences of offsets in [0, 2**63)) copied into a new one."""
    cdef array.array flat
    cdef Py_ssize_t n, i
    cdef int64_t s, e
    cdef int64_t *p
    if isinstance(runs, Runs):
        flat = runs.flat
        i = _first_negative(flat)
        if i >= 0:
            raise ValueError(f"negative offset in run {runs[i]!r}")
        return flat
    # A copy even of a list (of pointers: cheap): unpacking an item may run Python code, which
    # must not be able to change what is being read.
    cdef list seq = list(runs)
    n = len(seq)
    flat = array.clone(_TEMPLATE, 2 * n, zero=False)
    p = <int64_t *>flat.data.as_voidptr
    for i in range(n):
        item = seq[i]
        s, e = item
        if s < 0 or e < 0:
            raise ValueError(f"negative offset in run {item!r}")
        p[2 * i] = s
        p[2 * i + 1] = e
    return flat


cdef Py_ssize_t _first_negative(const int64_t[::1] v):
    cdef Py_ssize_t i, n = v.shape[0]
    with nogil:
        for i in range(n):
            if v[i] < 0:
                return i // 2
    return -1


cdef object _runs(const Run *buf, Py_ssize_t m):
    """A new Runs of the m runs at buf."""
    cdef array.array out = array.clone(_TEMPLATE, 2 * m, zero=False)
    if m:
        memcpy(out.data.as_voidptr, buf, m * sizeof(Run))
    return wrap(out)


def merge_runs(runs, int64_t size, int64_t block=65536):
    """[start, end) runs in any order -> sorted, merged, rounded outward to block, clipped."""
    if block < 1:
        raise ValueError(f"block is {block}, not a positive size")
    cdef const int64_t[::1] v = _flat(runs)
    cdef Py_ssize_t n = v.shape[0] // 2, i, m = 0
    cdef Run *buf = <Run *>malloc((n + 1) * sizeof(Run))
    cdef int sorted_ = 0
    if buf == NULL:
        raise MemoryError()
    try:
        with nogil:
            if n:
                memcpy(buf, &v[0], n * sizeof(Run))
            for i in range(n):
                buf[i].s -= buf[i].s % block
                if buf[i].e > _TOP - (block - 1):
                    buf[i].e = size  # rounded up it would pass 2**63 - 1, which no size reaches
                else:
                    buf[i].e = (buf[i].e + block - 1) // block * block
                    if buf[i].e > size:
                        buf[i].e = size
            if n:
                sorted_ = _sort(buf, n)
            for i in range(n if sorted_ == 0 else 0):
                if m and buf[i].s <= buf[m - 1].e:
                    if buf[i].e > buf[m - 1].e:
                        buf[m - 1].e = buf[i].e
                else:
                    buf[m] = buf[i]
                    m += 1
        if sorted_ < 0:
            raise MemoryError()
        return _runs(buf, m)
    finally:
        free(buf)


cdef Run *_room(Run *buf, Py_ssize_t *cap, Py_ssize_t m) noexcept nogil:
    """buf with room for run m: grown (doubled) when full; NULL when that fails (buf is then
    left as it was, still the caller's to free)."""
    cdef Run *grown
    if m < cap[0]:
        return buf
    grown = <Run *>realloc(buf, 2 * cap[0] * sizeof(Run))
    if grown != NULL:
        cap[0] *= 2
    return grown


cdef int _push(Run **outp, Py_ssize_t *cap, Py_ssize_t *m, int64_t s, int64_t e) noexcept nogil:
    """Append run (s, e) to *outp (grown when full): 0, or -1 when out of memory."""
    cdef Run *grown = _room(outp[0], cap, m[0])
    if grown == NULL:
        return -1
    outp[0] = grown
    grown[m[0]].s = s
    grown[m[0]].e = e
    m[0] += 1
    return 0


cdef Py_ssize_t _subtract(const Run *ra, Py_ssize_t na, const Run *rb, Py_ssize_t nb,
                          Run **outp, Py_ssize_t *cap) noexcept nogil:
    """The runs of ra not covered by rb into *outp (grown as needed): how many, or -1 when out of
    memory."""
    cdef Py_ssize_t i, j = 0, k, m = 0
    cdef int64_t s, e
    for i in range(na):
        s = ra[i].s
        e = ra[i].e
        while j < nb and rb[j].e <= s:
            j += 1
        k = j
        while s < e:
            if k >= nb or rb[k].s >= e:
                if _push(outp, cap, &m, s, e) < 0:
                    return -1
                break
            if rb[k].s > s:
                if _push(outp, cap, &m, s, rb[k].s) < 0:
                    return -1
            if rb[k].e > s:
                s = rb[k].e
            k += 1
    return m


def subtract_runs(a, b):
    """Runs of a not covered by b (both sorted and disjoint)."""
    cdef const int64_t[::1] va = _flat(a)
    cdef const int64_t[::1] vb = _flat(b)
    cdef Py_ssize_t na = va.shape[0] // 2, nb = vb.shape[0] // 2, m
    # Sorted, disjoint runs of a give at most na + nb pieces; overlapping ones (outside the
    # contract, but the twin takes them) may give more, so the array grows when full.
    cdef Py_ssize_t cap = na + nb + 1
    cdef Run *out = <Run *>malloc(cap * sizeof(Run))
    if out == NULL:
        raise MemoryError()
    try:
        with nogil:
            m = _subtract(<const Run *>&va[0] if na else NULL, na,
                          <const Run *>&vb[0] if nb else NULL, nb, &out, &cap)
        if m < 0:
            raise MemoryError()
        return _runs(out, m)
    finally:
        free(out)


def clip_runs(a, int64_t start, int64_t end):
    """The parts of runs a inside [start, end)."""
    cdef const int64_t[::1] v = _flat(a)
    cdef Py_ssize_t n = v.shape[0] // 2, i, m = 0
    cdef array.array flat = array.clone(_TEMPLATE, 2 * n, zero=False)
    cdef int64_t *out = <int64_t *>flat.data.as_voidptr
    cdef int64_t s, e
    with nogil:
        for i in range(n):
            s = v[2 * i] if v[2 * i] > start else start
            e = v[2 * i + 1] if v[2 * i + 1] < end else end
            if s < e:
                out[2 * m] = s
                out[2 * m + 1] = e
                m += 1
    array.resize(flat, 2 * m)
    return wrap(flat)


def runs_bytes(a):
    """The bytes the runs cover (the sum of end - start)."""
    cdef const int64_t[::1] v = _flat(a)
    cdef Py_ssize_t n = v.shape[0] // 2, i = 0
    cdef object total = 0
    cdef int64_t part = 0, d
    while True:
        with nogil:
            while i < n:
                d = v[2 * i + 1] - v[2 * i]
                # Any one disk's runs add up within int64, arbitrary pairs need not: carry into
                # a Python int before a step would overflow, so the twin's answer is given.
                if (d > 0 and part > _TOP - d) or (d < 0 and part < -_TOP - d):
                    break
                part += d
                i += 1
        if i == n:
            return total + part
        total += part
        part = 0
