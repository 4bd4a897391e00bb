"""The reports the engine returns: what a copy, a checksum, a verify, a sync pass and a
migration did. One home for the output schema (issue 13): the Python API returns these, the
CLI writes them as JSON (--report), orchestrators read them.

A field named after a Python keyword ends in an underscore (pass_) and is written without it.
"""

from __future__ import annotations

import json
import keyword
from dataclasses import asdict, dataclass, field
from typing import Any


def _plain(value: Any) -> Any:
    """asdict's output with keyword-named keys (pass_) written as the keyword."""
    if isinstance(value, dict):
        return {(k[:-1] if k.endswith("_") and keyword.iskeyword(k[:-1]) else k): _plain(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Serializable:
    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass
class Report(Serializable):
    """What copy() did."""

    source: str
    target: str
    size: int
    target_size: int
    bytes_copied: int
    bytes_zeroed: int
    bytes_skipped: int
    bytes_read: int
    seconds: float
    digest: str
    connections: int
    requests: int
    zero_requests: int
    request_size: int
    in_flight: int
    zero_method: str
    target_created: bool
    flushed: bool
    native: dict[str, str] = field(default_factory=dict)
    manifest: str | None = None
    verified: bool = False  # read back and compared block by block (copy --verify)
    verify_seconds: float | None = None
    verify_bytes_read: int | None = None
    retries: int = 0  # reads issued again after an error (RELIABILITY.md S1b: reported)
    reconnects: int = 0


@dataclass
class ChecksumReport(Serializable):
    """What checksum() read and the digest it found."""

    disk: str
    size: int
    digest: str
    seconds: float
    bytes_read: int
    connections: int
    native: dict[str, str] = field(default_factory=dict)
    manifest: str | None = None


@dataclass
class VerifyReport(Serializable):
    """Whether verify() found the target equal, and where it differs."""

    equal: bool
    source: str | None
    target: str
    size: int
    target_size: int
    blocks: int
    differing_blocks: int | None  # None: compared with a digest only, which cannot say which
    first_differences: list[int]
    source_digest: str
    target_digest: str
    seconds: float
    bytes_read: int


@dataclass
class SyncReport(Serializable):
    """What one sync pass did."""

    source: str
    target: str
    state: str
    pass_: int
    checkpoint: str | None
    change_source: str  # in words: what decided which blocks were copied
    fallback: str | None  # why the asked-for change source was not used (R2), or None
    resumed: bool  # this run finished work an interrupted run left
    delta_bytes: int  # bytes planned for this pass (what the change source named)
    bytes_copied: int
    bytes_zeroed: int
    bytes_skipped: int
    bytes_unchanged: int
    bytes_read: int
    seconds: float
    digest: str
    size: int
    commits: int
    final: bool = False
    verified: bool = False
    verify_source: bool = False
    complete: bool = False
    connections: int = 0
    retries: int = 0
    reconnects: int = 0
    native: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what else happened, in words
    audit: dict[str, Any] | None = None  # the tracker audit: sampled, mismatched, seconds
    read_back: dict[str, Any] | None = None  # bytes, mismatched, seconds of this run's read-back
    rewritten: int = 0  # bytes a read-back had found wrong, planned again by this pass


@dataclass
class PassInfo(Serializable):
    pass_: int
    start: str  # ISO time the pass began (local, to the millisecond)
    change_source: str
    fallback: str | None
    delta_bytes: int
    bytes_copied: int
    seconds: float
    copy_rate: float | None  # bytes/s beyond the per-pass overhead
    dirty_rate: float | None  # bytes/s the guest dirtied while the pass's bitmap recorded
    predicted_downtime: float | None  # if cutover happened right after this pass
    final: bool = False
    note: str | None = None  # what else this pass did, in words (a merge of bitmaps, R3)
    # the block node this pass copied (a VM's disks each have their passes); copy_rate,
    # dirty_rate and predicted_downtime are the whole VM's (the disks share the bandwidth)
    disk: str | None = None


@dataclass
class MigrateReport(Serializable):
    """A migration of one disk, or of a VM's disks: target and node are then the disks'
    joined with ",", size their sum, digest empty (each disk's is in disks), passes every
    disk's (PassInfo.disk), cutover the VM's one stop and downtime."""

    type: str
    target: str
    node: str
    size: int
    passes: list[PassInfo] = field(default_factory=list)
    cutover: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    converged: bool | None = None
    seconds: float = 0.0
    disks: list[dict[str, Any]] = field(default_factory=list)  # node, target, size, digest
