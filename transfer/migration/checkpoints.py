"""The qemu-storage-daemon side of a migration, over QMP: its NBD server, our read-only export
of the node (with bitmap k for pass k), and the dirty bitmaps handed over before each pass.

Before every pass one QMP `transaction` adds dirty bitmap k+1 and disables bitmap k (pass 0
adds bitmap 1 before it reads: R1), the node is exported read-only with bitmap k, and sync
copies what it names; bitmap k is removed only after the pass committed and was logged. A
final pass merges bitmap k into k+1 when an earlier run handed over and died before it logged
pass k (R3: B_k and B_k+1). A bitmap the daemon lost, or left inconsistent, makes a compare
pass (R2). Every QMP exchange runs on a thread, to its end even when cancelled (Monitor): the
event loop stays free for signals.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any, Callable

from ..aio import to_the_end
from ..errors import BadInput, SourceError
from ..qmp import Qmp, QmpError

PREFIX = "transfer-"
EXPORT = "transfer-src"

Log = dict[str, Any]  # the migration's log: next pass, passes so far, hand-over times


class Daemon:
    """One migration's view of the daemon holding `node` (QMP at qmp_path)."""

    def __init__(self, q: "Monitor", node: str, qmp_path: str, state: str,
                 nbd_socket: str | None) -> None:
        self.q, self.node, self.qmp_path, self.state = q, node, qmp_path, state
        self.nbd_socket = nbd_socket

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
        args: dict[str, Any] = {"type": "nbd", "id": EXPORT, "node-name": self.node,
                                "name": EXPORT, "writable": False}
        if bitmap:
            args["bitmaps"] = [bitmap]
        await self.q.execute("block-export-add", **args)
        return f"nbd+unix:///{EXPORT}?socket={self.nbd_socket}"

    async def unexport(self) -> None:
        """Remove our export (if any) and wait until it is gone: its name is then free."""
        q = self.q
        exports = await q.execute("query-block-exports")
        if not any(isinstance(e, dict) and e.get("id") == EXPORT for e in exports):
            return
        try:
            await q.execute("block-export-del", id=EXPORT)
        except QmpError:
            pass  # being deleted already
        deadline = time.monotonic() + 30
        while any(isinstance(e, dict) and e.get("id") == EXPORT
                  for e in await q.execute("query-block-exports")):
            if time.monotonic() > deadline:
                raise SourceError("the daemon did not remove our NBD export within 30 s",
                                  disk=self.qmp_path)
            await asyncio.sleep(0.02)

    async def merge_unlogged(self, log: Log, save: Callable[[Log], None],
                             cold: bool) -> str | None:
        """Before a final pass: if an earlier run handed over from bitmap k to k+1 and died
        before pass k was logged (before its sync began, during it, or after its commit), the
        target may lack what bitmap k names, and bitmap k+1 holds every write since the
        hand-over. R3: copy B_k and B_k+1. Bitmap k is merged into bitmap k+1 (the VM is
        stopped: k+1 is the last; merging again is harmless) and the final pass runs as pass
        k+1 under it, so that sync copies the union (with the tainted ranges of an unfinished
        pass k). Returns a note for the report, or None when there was no such hand-over."""
        k = log["next"]
        cur, nxt = f"{PREFIX}{k}", f"{PREFIX}{k + 1}"
        bitmaps = await self.q.bitmaps(self.node)
        if cold or k == 0 or cur not in bitmaps or nxt not in bitmaps:
            return None
        if bitmaps[cur].get("inconsistent") or bitmaps[nxt].get("inconsistent"):
            return None  # hand_over falls back to a compare pass (R2)
        await self.q.execute("block-dirty-bitmap-merge", node=self.node, target=nxt,
                             bitmaps=[cur])
        # when the hand-over happened is unknown if the run died before logging it: now is
        # later than it, which only makes the bitmaps look younger than they are
        log["handover"].setdefault(str(k), time.time())
        log["next"] = k + 1
        save(log)  # from here pass k+1 holds the union; bitmap k may go (it is < next)
        return (f"pass {k} was not logged by an earlier run after its hand-over: bitmap {cur} "
                f"was merged into {nxt}, which the final pass copies")

    async def hand_over(self, log: Log, *, final: bool, cold: bool
                        ) -> tuple[str | None, str | None]:
        """Bitmaps for pass k = log["next"]: (the bitmap its sync copies, None for a full or
        compare pass; why it fell back to a compare pass, or None). The hand-over time goes
        into log["handover"]; the caller saves the log."""
        k = log["next"]
        cur, nxt = f"{PREFIX}{k}", f"{PREFIX}{k + 1}"
        bitmaps = await self._drop_stale(k)
        if cold:
            return None, None
        if k == 0:
            if nxt not in bitmaps:  # R1 base case: recording before the first read
                await self._add(nxt)
            log["handover"]["0"] = log["handover"].get("0", time.time())
            return None, None
        fallback = _unusable(bitmaps, cur, nxt, self.node, final)
        if fallback is not None:
            if nxt not in bitmaps:
                await self._add(nxt)
            log["handover"][str(k)] = time.time()
            return None, fallback
        if nxt not in bitmaps and not final:
            await self.q.execute("transaction", actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": self.node, "name": nxt}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": self.node,
                                                                "name": cur}}])
        elif bitmaps[cur].get("recording"):  # final: the VM is stopped, nothing to hand to
            await self.q.execute("block-dirty-bitmap-disable", node=self.node, name=cur)
        log["handover"].setdefault(str(k), time.time())
        return cur, None

    async def drop(self, bitmap: str) -> None:
        await self.q.execute("block-dirty-bitmap-remove", node=self.node, name=bitmap)

    async def _add(self, bitmap: str) -> None:
        await self.q.execute("block-dirty-bitmap-add", node=self.node, name=bitmap)

    async def _drop_stale(self, k: int) -> dict[str, dict[str, Any]]:
        """Remove our bitmaps below k (left by a run killed between its commit and their
        removal); the node's bitmaps as they were before."""
        bitmaps = await self.q.bitmaps(self.node)
        for name in bitmaps:
            m = re.fullmatch(re.escape(PREFIX) + r"(\d+)", name)
            if m and int(m.group(1)) < k:
                await self.drop(name)
        return bitmaps


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

    async def execute(self, command: str, **arguments: Any) -> Any:
        return await to_the_end(self.q.execute, command, **arguments)

    async def node(self, name: str) -> dict[str, Any]:
        return await to_the_end(self.q.node, name)

    async def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        return await to_the_end(self.q.bitmaps, node)

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
