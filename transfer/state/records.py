"""A warm migration's journal, read back: its records validated into a State.

The journal (transfer.state.journal) holds records, each carrying the state's id:

    bind      source and target identities, size, block, hash (again when the source is
              served at a new address: recorded, not refused; the source is its --source-id,
              or its export name, or a local file's inode; version 1, the fields added since
              optional)
    begin     pass, checkpoint, change source, planned ranges, audit
    commit    pass, upto: every planned byte below is durable
    end       pass, checkpoint, digest, delta bytes
    verified  pass, bytes, mismatched: every begin record before it was read back (its
              mismatches POISONed in the manifest first)
    complete

Records are untrusted input (RELIABILITY.md P5): load_state checks each one's fields and its
place in the order, and the first that does not make sense is a JournalError naming it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..integrity import BLOCK
from ..runs import Runs
from ..tracking.areas import union_runs
from .journal import Journal, JournalError
from .ranges_file import read_ranges

VERSION = 1
HASH = "xxh3-128"
MAX_SUSPECTS = 1 << 16  # blocks a live audit may leave for the next pass to explain
_RANGES_FILE = re.compile(r"pass-\d+-\d+\.ranges")

Bad = Callable[[str], JournalError]  # a record's complaint, as the error that names it


@dataclass
class PassState:
    number: int
    begin: dict[str, Any]
    ranges: Any | None  # (n, 2) planned ranges; None for the whole disk
    upto: int = 0  # last committed frontier (the begin record's start before any commit)
    plan_known: bool = True
    ended: dict[str, Any] | None = None


@dataclass
class State:
    """The journal, read and checked: every record of one state, in an order that makes sense."""

    path: str
    id: str | None = None
    bind: dict[str, Any] | None = None
    passes: list[PassState] = field(default_factory=list)
    complete: bool = False
    resized: tuple | None = None  # (old, new) size of a bind no pass has begun after
    pending: list[dict[str, Any]] = field(default_factory=list)  # begins not yet read back

    @property
    def last(self) -> PassState | None:
        return self.passes[-1] if self.passes else None


def offset_ok(value: Any, size: Any) -> bool:
    """A journal offset: a whole number, block-aligned or the disk's end, inside the disk."""
    return (type(value) is int and type(size) is int and 0 <= value <= size
            and (value % BLOCK == 0 or value == size))


def load_state(directory: str, journal: Journal) -> State:
    """Validate the journal's records (untrusted input, P5); JournalError names the first bad one."""
    st = State(directory)
    for i, rec in enumerate(journal.records):

        def bad(why: str, i: int = i) -> JournalError:
            return JournalError(f"record {i + 1} {why}; the state cannot be trusted (start "
                                "again with an empty state directory)", disk=journal.path)

        kind = rec.get("t")
        if i == 0:
            if kind != "bind" or not isinstance(rec.get("state"), str):
                raise bad("is not the state's first (bind) record")
            st.id = rec["state"]
        elif rec.get("state") != st.id:
            raise bad(f"belongs to another state ({rec.get('state')!r}, not {st.id!r})")
        if st.complete:
            raise bad("follows the record that completed the state")
        handler = _HANDLERS.get(kind)
        if handler is None:
            raise bad(f"has an unknown type {kind!r}")
        handler(st, rec, bad)
    _read_last_plan(st)
    return st


def _read_last_plan(st: State) -> None:
    last = st.last
    if last is None or last.begin["ranges"] == "all":
        return
    plan = last.begin["ranges"]  # only the last pass's plan is ever needed
    try:
        last.ranges = read_ranges(os.path.join(st.path, plan["file"]), last.begin["size"],
                                  plan["check"], plan["count"])
    except JournalError:
        if not last.ended:  # an unfinished pass cannot be resumed without its plan
            raise
        last.plan_known = False  # an ended one: a rerun of its checkpoint copies more


def _bind(st: State, rec: dict[str, Any], bad: Bad) -> None:
    if st.bind is not None and rec.get("size") != st.bind["size"]:
        st.resized = (st.bind["size"], rec.get("size"))  # until a pass begins after it
    for key, typ in (("source", dict), ("target", dict), ("size", int), ("block", int),
                     ("hash", str), ("version", int)):
        if not isinstance(rec.get(key), typ):
            raise bad(f"(bind) has no valid {key!r}")
    if rec["version"] != VERSION or rec["block"] != BLOCK or rec["hash"] != HASH:
        raise bad(f"(bind) is for version {rec['version']}, block {rec['block']}, "
                  f"hash {rec['hash']}; this engine has {VERSION}, {BLOCK}, {HASH}")
    if st.bind is not None and rec["state"] != st.id:
        raise bad("(bind) names another state")
    st.bind = rec  # a later one: the source moved, or its size changed (maybe mid-pass)


def _begin(st: State, rec: dict[str, Any], bad: Bad) -> None:
    n = rec.get("pass")
    if not isinstance(n, int) or isinstance(n, bool):
        raise bad("(begin) has no pass number")
    last = st.last
    want = {0} if last is None else (
        {last.number + 1} if last.ended else {last.number, last.number + 1})
    if n not in want:
        raise bad(f"(begin) starts pass {n} where {sorted(want)} was expected")
    if st.bind and rec.get("size") != st.bind["size"]:
        raise bad("(begin) is for another disk size")
    plan = rec.get("ranges")
    if not (plan == "all" or isinstance(plan, dict)
            and isinstance(plan.get("count"), int) and isinstance(plan.get("check"), str)
            and isinstance(plan.get("file"), str) and _RANGES_FILE.fullmatch(plan["file"])):
        raise bad("(begin) has no valid planned ranges")
    start = rec.get("start", 0)
    if (not offset_ok(start, rec.get("size")) or not isinstance(rec.get("change_source"), str)
            or not isinstance(rec.get("compare"), bool)):
        raise bad(f"(begin) has an invalid start {start!r}, change source or mode")
    audit = rec.get("audit")
    suspects = audit.get("suspects", []) if isinstance(audit, dict) else None
    if audit is not None and not (
            isinstance(suspects, list) and len(suspects) <= MAX_SUSPECTS
            and all(offset_ok(o, rec["size"]) and o < rec["size"] for o in suspects)):
        raise bad("(begin) has an invalid audit record")
    st.resized = None
    st.passes.append(PassState(n, rec, None, upto=start))
    st.pending.append(rec)


def _commit(st: State, rec: dict[str, Any], bad: Bad) -> None:
    last = st.last
    upto = rec.get("upto")
    if last is None or last.ended or rec.get("pass") != last.number:
        raise bad("(commit) is for no pass in progress")
    if not offset_ok(upto, last.begin["size"]) or not last.upto < upto:
        raise bad(f"(commit) up to {upto!r} does not advance within the disk")
    last.upto = upto


def _end(st: State, rec: dict[str, Any], bad: Bad) -> None:
    last = st.last
    if last is None or last.ended or rec.get("pass") != last.number:
        raise bad("(end) is for no pass in progress")
    last.ended = rec


def _verified(st: State, rec: dict[str, Any], bad: Bad) -> None:
    last = st.last
    if last is None or not last.ended or rec.get("pass") != last.number:
        raise bad("(verified) follows no finished pass")
    if type(rec.get("mismatched")) is not int or rec["mismatched"] < 0:
        raise bad("(verified) has no valid count of mismatched blocks")
    st.pending = []


def _complete(st: State, rec: dict[str, Any], bad: Bad) -> None:
    if st.last is None or not st.last.ended:
        raise bad("(complete) follows no finished pass")
    st.complete = True


_HANDLERS: dict[Any, Callable[[State, dict[str, Any], Bad], None]] = {
    "bind": _bind, "begin": _begin, "commit": _commit, "end": _end, "verified": _verified,
    "complete": _complete}


def pending_ranges(st: State, size: int) -> Runs | list[tuple[int, int]]:
    """What the passes begun since the last read-back planned: the target ranges that may
    have been written and not read back since. A plan that is the whole disk, or whose ranges
    file is unusable or for another size, makes it the whole disk (read more, never less)."""
    runs: Runs | list[tuple[int, int]] = []
    for rec in st.pending:
        plan = rec["ranges"]
        if plan == "all" or rec["size"] != size:
            return [(0, size)]
        try:
            got = read_ranges(os.path.join(st.path, plan["file"]), size, plan["check"],
                              plan["count"])
        except JournalError:
            return [(0, size)]
        runs = union_runs(runs, got, size)
    return runs
