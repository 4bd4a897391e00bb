"""Runs: [start, end) byte ranges held flat in one int64 array, [s0, e0, s1, e1, ...].

What the interval algebra (native/intervals.pyx and its twins in transfer/_native/_reference.py)
returns and takes, and what a warm pass plans with. A list of (start, end) tuples costs ~120
bytes a run (a tuple and two ints); a million scattered blocks made ~120 MB of them, and every
kernel call converted them in and out. Here a run is 16 bytes, and a kernel reads the array
directly, without the GIL. numpy would do the same, but importing it costs a pass ~60 ms.

A Runs reads as the list of pairs it replaces: len, iteration and indexing give (start, end)
tuples, and it compares equal to a list of the same pairs (the tests compare with lists). It is
immutable: a kernel may hand the same array to the next one. What it holds is not checked here:
the kernels check what they are given (transfer/_native), the callers what they read (a
changed-areas file, a ranges file).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import overload

TYPECODE = "q"  # int64: the compiled kernels' element type


class Runs:
    """Runs as one flat int64 array; see the module's docstring."""

    __slots__ = ("flat",)
    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        self.flat = array(TYPECODE, [x for s, e in pairs for x in (s, e)])

    @classmethod
    def of(cls, runs: Runs | Iterable[tuple[int, int]]) -> Runs:
        """runs itself when it is a Runs, else its pairs as one."""
        return runs if isinstance(runs, Runs) else cls(runs)

    def __len__(self) -> int:
        return len(self.flat) // 2

    def __iter__(self) -> Iterator[tuple[int, int]]:
        it = iter(self.flat)
        return zip(it, it)  # pairs, made one at a time

    @overload
    def __getitem__(self, i: int) -> tuple[int, int]: ...
    @overload
    def __getitem__(self, i: slice) -> Runs: ...

    def __getitem__(self, i: int | slice) -> tuple[int, int] | Runs:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return wrap(self.flat[2 * start:2 * max(start, stop)])
            return Runs(list(self)[i])
        # Run i is items 2i and 2i + 1, for a negative i too (-1: the last two); an i out of
        # range puts 2i out of range (IndexError). A plan walks its runs one by one: no more.
        flat = self.flat
        return (flat[2 * i], flat[2 * i + 1])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Runs):
            return self.flat == other.flat
        if isinstance(other, list):  # as the list of tuples it replaces would compare
            return len(other) == len(self) and all(p == q for p, q in zip(other, self))
        return NotImplemented

    def __add__(self, other: Runs | Iterable[tuple[int, int]]) -> Runs:
        """The runs of both, self's first (not merged: merge_runs does that)."""
        return wrap(self.flat + Runs.of(other).flat)

    def __radd__(self, other: Iterable[tuple[int, int]]) -> Runs:
        """A list + a Runs: the runs of both, the list's first, as a Runs."""
        return wrap(Runs(other).flat + self.flat)

    def __repr__(self) -> str:
        return f"Runs({list(self)!r})"

    def starts(self) -> memoryview:
        """The starts, in order, as a view (no copy): what bisect searches."""
        return memoryview(self.flat)[0::2]


def wrap(flat: array) -> Runs:
    """A Runs over flat (an int64 array of even length), without a copy: flat is its own now."""
    runs = Runs.__new__(Runs)
    runs.flat = flat
    return runs
