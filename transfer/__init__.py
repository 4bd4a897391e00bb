"""transfer: a block-level disk transfer engine for moving VM disks into KubeVirt."""

from .api import (ChecksumReport, Report, VerifyReport, checksum, checksum_async, copy,
                  copy_async, verify, verify_async)
from .errors import (BadInput, Interrupted, SourceError, TargetError, TargetRefused,
                     TransferError, VerifyFailed)

__all__ = [
    "BadInput",
    "ChecksumReport",
    "Interrupted",
    "Report",
    "SourceError",
    "TargetError",
    "TargetRefused",
    "TransferError",
    "VerifyFailed",
    "VerifyReport",
    "checksum",
    "checksum_async",
    "copy",
    "copy_async",
    "verify",
    "verify_async",
]
