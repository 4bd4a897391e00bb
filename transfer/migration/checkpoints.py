"""The qemu-storage-daemon side of a migration, over QMP: its NBD server, our read-only export
of each node (with bitmap k for pass k), and the dirty bitmaps handed over before each pass.

Before every pass one QMP `transaction` adds dirty bitmap k+1 and disables bitmap k on every
node of the VM together (pass 0 adds bitmap 1 before it reads: R1), so that all the disks'
deltas are cut at the same instant; each node is exported read-only with its bitmap k under an
export name of its own, and sync copies what it names; bitmap k is removed only after every
disk's pass committed and the pass was logged (one durable write for all disks). A
final pass merges bitmap k into k+1 when an earlier run handed over and died before it logged
pass k (R3: B_k and B_k+1). A bitmap the daemon lost, or left inconsistent, makes a compare
pass (R2). Every QMP exchange runs on a thread, to its end even when cancelled (Monitor): the
event loop stays free for signals.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from typing import Any, Callable

from ..aio import to_the_end
from ..errors import BadInput, SourceError
from ..qmp import Qmp, QmpError

PREFIX = "transfer-"
EXPORT = "transfer-src"

Log = dict[str, Any]  # the migration's log: next pass, passes so far, hand-over times


class Daemon:
    """One migration's view of the daemon holding `node` (QMP at qmp_path), exported as
    `export` (one name per node: a VM's disks are exported side by side)."""

    def __init__(self, q: "Monitor", node: str, qmp_path: str, state: str,
                 nbd_socket: str | None, export: str = EXPORT) -> None:
        self.q, self.node, self.qmp_path, self.state = q, node, qmp_path, state
        self.nbd_socket, self.export_name = nbd_socket, export

    async def nbd_server(self) -> None:
        """Start the daemon's NBD server on a socket in the state directory, unless the
        caller named the socket of one that runs."""
        if self.nbd_socket is not None:
            return
        self.nbd_socket = os.path.join(os.path.abspath(self.state), "nbd.sock")
        try:
            await self.q.execute("nbd-server-start",
                                 addr={"type": "unix", "data": {"path": self.nbd_socket}})
        except QmpError as e:
            if "already running" in e.message:
                raise BadInput("the daemon already runs an NBD server: name its socket with "
                               "--nbd-socket", disk=self.qmp_path) from None
            raise

    async def export(self, bitmap: str | None) -> str:
        """Export the node read-only (with bitmap); its NBD URI."""
        await self.unexport()
        name = self.export_name
        args: dict[str, Any] = {"type": "nbd", "id": name, "node-name": self.node,
                                "name": name, "writable": False}
        if bitmap:
            args["bitmaps"] = [bitmap]
        await self.q.execute("block-export-add", **args)
        return f"nbd+unix:///{name}?socket={self.nbd_socket}"

    async def unexport(self) -> None:
        """Remove our export (if any) and wait until it is gone: its name is then free."""
        q, name = self.q, self.export_name
        exports = await q.execute("query-block-exports")
        if not any(isinstance(e, dict) and e.get("id") == name for e in exports):
            return
        try:
            await q.execute("block-export-del", id=name)
        except QmpError:
            pass  # being deleted already
        deadline = time.monotonic() + 30
        while any(isinstance(e, dict) and e.get("id") == name
                  for e in await q.execute("query-block-exports")):
            if time.monotonic() > deadline:
                raise SourceError("the daemon did not remove our NBD export within 30 s",
                                  disk=self.qmp_path)
            await asyncio.sleep(0.02)

    async def merge_unlogged(self, k: int, cold: bool) -> str | None:
        """Before a final pass: if an earlier run handed over from bitmap k to k+1 and died
        before pass k was logged (before its sync began, during it, or after its commit), the
        target may lack what bitmap k names, and bitmap k+1 holds every write since the
        hand-over. R3: copy B_k and B_k+1. Bitmap k is merged into bitmap k+1 (the VM is
        stopped: k+1 is the last; merging again is harmless); merge_unlogged (the function)
        then makes the final pass pass k+1, so that sync copies the union (with the tainted
        ranges of an unfinished pass k). Returns a note for the report, or None when there
        was no such hand-over."""
        cur, nxt = f"{PREFIX}{k}", f"{PREFIX}{k + 1}"
        bitmaps = await self.q.bitmaps(self.node)
        if cold or k == 0 or cur not in bitmaps or nxt not in bitmaps:
            return None
        if bitmaps[cur].get("inconsistent") or bitmaps[nxt].get("inconsistent"):
            return None  # hand_over falls back to a compare pass (R2)
        await self.q.execute("block-dirty-bitmap-merge", node=self.node, target=nxt,
                             bitmaps=[cur])
        return (f"pass {k} was not logged by an earlier run after its hand-over: bitmap {cur} "
                f"was merged into {nxt}, which the final pass copies")

    async def plan_hand_over(self, k: int, *, final: bool, cold: bool
                             ) -> tuple[list[dict[str, Any]], str | None, str | None]:
        """Pass k's hand-over on this node: (the transaction actions it needs, the bitmap its
        sync copies or None for a full or compare pass, why it fell back to a compare pass or
        None). Our bitmaps below k are removed first."""
        cur, nxt = f"{PREFIX}{k}", f"{PREFIX}{k + 1}"
        bitmaps = await self._drop_stale(k)
        if cold:
            return [], None, None
        add = [] if nxt in bitmaps else [_action("add", self.node, nxt)]
        if k == 0:  # R1 base case: recording before the first read
            return add, None, None
        fallback = _unusable(bitmaps, cur, nxt, self.node, final)
        if fallback is not None:
            return add, None, fallback
        if nxt not in bitmaps and not final:
            return add + [_action("disable", self.node, cur)], cur, None
        if bitmaps[cur].get("recording"):  # final: the VM is stopped, nothing to hand to
            return [_action("disable", self.node, cur)], cur, None
        return [], cur, None

    async def drop(self, bitmap: str) -> None:
        await self.q.execute("block-dirty-bitmap-remove", node=self.node, name=bitmap)

    async def _drop_stale(self, k: int) -> dict[str, dict[str, Any]]:
        """Remove our bitmaps below k (left by a run killed between its commit and their
        removal); the node's bitmaps as they were before."""
        bitmaps = await self.q.bitmaps(self.node)
        for name in bitmaps:
            m = re.fullmatch(re.escape(PREFIX) + r"(\d+)", name)
            if m and int(m.group(1)) < k:
                await self.drop(name)
        return bitmaps


async def merge_unlogged(daemons: list[Daemon], log: Log, save: Callable[[Log], None],
                         cold: bool) -> dict[str, str]:
    """Daemon.merge_unlogged on every node; if any merged, the final pass becomes pass k+1
    (logged at once: from here pass k+1 holds the union, bitmap k may go). A node that did
    not merge then finds no bitmap k+1 and compares (R2). Returns node -> note."""
    k = log["next"]
    notes = {}
    for d in daemons:
        note = await d.merge_unlogged(k, cold)
        if note is not None:
            notes[d.node] = note
    if notes:
        # when the hand-over happened is unknown if the run died before logging it: now is
        # later than it, which only makes the bitmaps look younger than they are
        log["handover"].setdefault(str(k), time.time())
        log["next"] = k + 1
        save(log)
    return notes


async def hand_over(daemons: list[Daemon], log: Log, *, final: bool, cold: bool
                    ) -> list[tuple[str | None, str | None]]:
    """Bitmaps for pass k = log["next"] on every node, in ONE QMP transaction (all disks'
    deltas cut at the same instant): per node (the bitmap its sync copies, None for a full
    or compare pass; why it fell back to a compare pass, or None). The hand-over time goes
    into log["handover"]; the caller saves the log."""
    k = log["next"]
    actions: list[dict[str, Any]] = []
    chosen = []
    for d in daemons:
        acts, bitmap, fallback = await d.plan_hand_over(k, final=final, cold=cold)
        actions += acts
        chosen.append((bitmap, fallback))
    if cold:
        return chosen
    if actions:
        await daemons[0].q.execute("transaction", actions=actions)
    if any(fallback is not None for _, fallback in chosen):
        log["handover"][str(k)] = time.time()  # the new bitmaps record from now
    else:
        log["handover"].setdefault(str(k), time.time())
    return chosen


def _action(verb: str, node: str, name: str) -> dict[str, Any]:
    return {"type": f"block-dirty-bitmap-{verb}", "data": {"node": node, "name": name}}


def _unusable(bitmaps: dict[str, dict[str, Any]], cur: str, nxt: str, node: str,
              final: bool) -> str | None:
    """Why bitmap cur cannot name pass k's changes, or None: the daemon lost it (restarted:
    everything may have changed, R2); or a final pass found bitmap k+1 unusable for the
    merge; or an interrupted final pass disabled bitmap k and a warm pass follows: the VM
    may have run unrecorded since."""
    if cur not in bitmaps:
        return f"bitmap {cur} is gone from node {node}"
    if bitmaps[cur].get("inconsistent") or final and nxt in bitmaps:
        return f"bitmap {cur} or {nxt} of node {node} is inconsistent"
    if not final and nxt not in bitmaps and not bitmaps[cur].get("recording"):
        return (f"bitmap {cur} stopped recording (an interrupted final pass) with "
                "no bitmap after it")
    return None


class Monitor:
    """The daemon's QMP monitor for coroutines: each exchange runs on a thread (the event
    loop stays free for signals) to its end even if cancelled meanwhile (a reply left unread
    would be taken for the next command's); the cancellation is raised after it."""

    def __init__(self, q: Qmp) -> None:
        self.q = q
        self.lock = threading.Lock()  # a VM's disks share the monitor: one exchange at a time

    def _one(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return call(*args, **kwargs)

    async def execute(self, command: str, **arguments: Any) -> Any:
        return await to_the_end(self._one, self.q.execute, command, **arguments)

    async def node(self, name: str) -> dict[str, Any]:
        return await to_the_end(self._one, self.q.node, name)

    async def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        return await to_the_end(self._one, self.q.bitmaps, node)

    def close(self) -> None:
        self.q.close()


async def connect_qmp(path: str) -> Qmp:
    """Qmp(path) on a thread; cancelled meanwhile, the connection is closed once made."""
    task = asyncio.ensure_future(asyncio.to_thread(Qmp, path))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(
            lambda t: t.cancelled() or t.exception() is not None or t.result().close())
        raise
