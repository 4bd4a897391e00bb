"""Per-block digests and the disk digest (DESIGN.md "Integrity")."""

from .manifest import BLOCK, POISON, Manifest, ManifestError, digest_string, zero_digest

__all__ = ["BLOCK", "POISON", "Manifest", "ManifestError", "digest_string", "zero_digest"]
