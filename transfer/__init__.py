"""transfer: a block-level disk transfer engine for moving VM disks into KubeVirt."""

from .api import (ChecksumReport, Report, VerifyReport, checksum, checksum_async, copy,
                  copy_async, verify, verify_async)
from .errors import (BadInput, Interrupted, SourceError, TargetError, TargetRefused,
                     TransferError, VerifyFailed)
from .state.sync import SyncReport, sync, sync_async

__all__ = [
    "BadInput",
    "ChecksumReport",
    "Interrupted",
    "Report",
    "SourceError",
    "SyncReport",
    "TargetError",
    "TargetRefused",
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
