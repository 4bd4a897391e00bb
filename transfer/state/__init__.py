"""Warm-migration state on disk: the journal (and, with it, the manifest file)."""
