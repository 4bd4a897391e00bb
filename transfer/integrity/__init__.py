"""Per-block digests and the disk digest (DESIGN.md "Integrity")."""

from .manifest import BLOCK, Manifest, ManifestError, digest_string, zero_digest

__all__ = ["BLOCK", "Manifest", "ManifestError", "digest_string", "zero_digest"]
