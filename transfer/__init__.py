"""transfer: a block-level disk transfer engine for moving VM disks into KubeVirt."""

from .api import checksum, checksum_async, copy, copy_async, verify, verify_async
from .reports import ChecksumReport, Report, SyncReport, VerifyReport
from .errors import (BadInput, Interrupted, SourceError, TargetError, TargetRefused,
                     TransferError, VerifyFailed)
from .tls import Tls

__all__ = [
    "BadInput",
    "ChecksumReport",
    "Interrupted",
    "Report",
    "SourceError",
    "SyncReport",
    "TargetError",
    "TargetRefused",
    "Tls",
    "TransferError",
    "VerifyFailed",
    "VerifyReport",
    "checksum",
    "checksum_async",
    "copy",
    "copy_async",
    "sync",
    "sync_async",
    "verify",
    "verify_async",
]


def __getattr__(name: str):
    """sync and migrate load on first use: the CLI's copy need not import them (~9 ms)."""
    if name in ("sync", "sync_async"):
        from .state import sync as module

        return getattr(module, name)
    raise AttributeError(f"module 'transfer' has no attribute {name!r}")
