"""The Python API: each verb takes addresses and options and returns a report.

    copy / copy_async           a cold copy of a whole disk (transfer.migration.cold)
    checksum / checksum_async   a disk's digest (transfer.migration.conversion)
    verify / verify_async       a target proved equal to a source or a digest (conversion)
    sync / sync_async           one warm-migration pass with its state (transfer.migration.warm)
    migrate_async               a whole migration of a qemu-storage-daemon node (migration.migrate)

Library code never prints, exits or configures logging: failures are TransferError subclasses
carrying their exit code, and progress goes to the caller's callback. The reports are
transfer.reports' dataclasses. sync and migrate load on first use: a CLI copy need not import
them.
"""

from __future__ import annotations

from typing import Any

from .migration.cold import copy, copy_async
from .migration.conversion import checksum, checksum_async, verify, verify_async
from .reports import ChecksumReport, MigrateReport, Report, SyncReport, VerifyReport

__all__ = ["ChecksumReport", "MigrateReport", "Report", "SyncReport", "VerifyReport", "checksum",
           "checksum_async", "copy", "copy_async", "migrate_async", "sync", "sync_async",
           "verify", "verify_async"]

_LATER = {"sync": "warm", "sync_async": "warm", "migrate_async": "migrate"}


def __getattr__(name: str) -> Any:
    if name in _LATER:
        import importlib

        return getattr(importlib.import_module(f".migration.{_LATER[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
