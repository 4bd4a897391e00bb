"""The stop command of a cutover (--on-cutover): run without blocking the event loop, in a
session of its own, so that a signal meanwhile, or its timeout, terminates its whole process
group (SIGTERM, then SIGKILL after half a second) and interrupts at once (RELIABILITY.md P3).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import tempfile
import time
from typing import Callable

from ..errors import BadInput, SourceError


async def run_stop_command(command: str, timeout: float, note: Callable[[str], None]) -> float:
    """Run command; its seconds. note(words) tells the caller the VM's state as the command
    leaves it (the report's cutover.on_cutover): terminated, timed out, failed, completed."""
    began = time.monotonic()
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: nothing to drain
        try:
            proc = subprocess.Popen(shlex.split(command), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=errors,
                                    start_new_session=True)
        except OSError as e:
            raise BadInput(f"cannot run the --on-cutover command: {e.strerror or e}") from None
        note("unknown: --on-cutover was terminated before it completed")
        waiter = asyncio.ensure_future(asyncio.to_thread(proc.wait))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            note("unknown: --on-cutover timed out and was terminated")
            await end_group(proc, waiter)
            raise SourceError(f"the --on-cutover command did not finish within {timeout:g} s "
                              "and was terminated; the VM may still run, no final pass was "
                              "taken") from None
        except BaseException:  # cancelled (a signal): the command must not outlive us
            await end_group(proc, waiter)
            raise
        if proc.returncode != 0:
            note(f"unknown: --on-cutover failed (exit {proc.returncode})")
            errors.seek(0)
            tail = errors.read()[-4096:].decode(errors="replace").strip()[-300:]
            raise SourceError(f"the --on-cutover command failed (exit {proc.returncode}): "
                              f"{tail}; no final pass was taken")
    note("stopped: --on-cutover completed")
    return time.monotonic() - began


async def end_group(proc: subprocess.Popen, waiter: asyncio.Future) -> None:
    """Terminate the process group of proc (its own session, started by us): SIGTERM, then
    after half a second SIGKILL for what is left of it; waiter (proc.wait on a thread) ends."""
    cancelled = False
    for sig, grace in ((signal.SIGTERM, 0.5), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # the group is gone
        if grace is not None:
            try:
                await asyncio.wait_for(asyncio.shield(waiter), grace)
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:  # a second signal: go on to SIGKILL
                cancelled = True
    while not waiter.done():
        try:
            await asyncio.wait({waiter})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
