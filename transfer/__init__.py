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
    """sync loads on first use: the CLI's copy need not import it (~9 ms)."""
    if name in ("sync", "sync_async"):
        from .migration import warm

        return getattr(warm, name)
    raise AttributeError(f"module 'transfer' has no attribute {name!r}")
