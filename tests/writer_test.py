"""A writer owns its target Conn: a flush asked for from another thread runs on the writer's
thread, after the writes submitted before it, and its failure reaches the caller."""

from __future__ import annotations

import threading

import pytest

from transfer.disks.base import Conn
from transfer.pipeline.scheduler import Scheduler
from transfer.pipeline.shared import Shared
from transfer.pipeline.writer import Writer

B = 64 * 1024


class Recorder(Conn):
    def __init__(self, fail_flush: bool = False) -> None:
        self.ops: list[tuple[str, str]] = []
        self.fail_flush = fail_flush

    def write(self, view, offset):
        self.ops.append(("write", threading.current_thread().name))

    def zero(self, offset, length):
        self.ops.append(("zero", threading.current_thread().name))

    def flush(self):
        self.ops.append(("flush", threading.current_thread().name))
        if self.fail_flush:
            raise OSError("flush failed")


def writer(conn: Conn) -> Writer:
    return Writer(conn, Shared(), Scheduler(4 * B, request_size=B), target_zero=False,
                  inline=False)


def test_a_flush_runs_on_the_writers_thread_after_the_writes_before_it():
    conn = Recorder()
    w = writer(conn)
    w.flush()  # not started: nobody else uses the Conn
    w.start()
    buf = memoryview(bytearray(B))
    w.submit(0, B, buf, None, 0)
    w.submit(B, B, None, None, None)
    w.flush()
    w.close()
    w.flush()  # closed: the thread is gone
    me = threading.current_thread().name
    assert conn.ops == [("flush", me), ("write", "transfer-write"), ("zero", "transfer-write"),
                        ("flush", "transfer-write"), ("flush", me)]
    assert w.stats.bytes_copied == B and w.stats.bytes_zeroed == B
    assert w.returned.get_nowait() == 0


def test_a_failed_flush_is_raised_to_the_caller():
    w = writer(Recorder(fail_flush=True))
    w.start()
    try:
        with pytest.raises(OSError, match="flush failed"):
            w.flush()
    finally:
        w.close()
