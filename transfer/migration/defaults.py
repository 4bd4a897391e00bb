"""A warm pass's defaults, in a module light to import: the CLI builds its options from them
without loading the engine."""

COMMIT_BYTES = 1 << 30  # commit at least every GiB copied...
COMMIT_SECONDS = 10.0  # ...or every 10 s: a kill re-copies at most this much
AUDIT_BLOCKS = 64  # unchanged blocks a delta pass reads to check its change source (P6)
MAX_AUDIT_BLOCKS = 1 << 20
