"""Per-block digests and the disk digest (DESIGN.md "Integrity")."""

from .manifest import BLOCK, Manifest, digest_string, zero_digest

__all__ = ["BLOCK", "Manifest", "digest_string", "zero_digest"]
