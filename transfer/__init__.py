"""transfer: a block-level disk transfer engine for moving VM disks into KubeVirt."""

from .api import Report, copy, copy_async
from .errors import (BadInput, Interrupted, SourceError, TargetError, TargetRefused,
                     TransferError, VerifyFailed)

__all__ = [
    "BadInput",
    "Interrupted",
    "Report",
    "SourceError",
    "TargetError",
    "TargetRefused",
    "TransferError",
    "VerifyFailed",
    "copy",
    "copy_async",
]
