"""One error tree for the engine: each class carries the exit code the CLI uses.

Library code raises these and never prints or exits; the CLI prints the
message on one line and exits with the class's code. Messages name the disk
by its redacted URL (no passwords, no query values) and the offset where there
is one.
"""

from __future__ import annotations


class TransferError(Exception):
    """Base of every expected failure."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, *, disk: str | None = None, offset: int | None = None,
                 length: int | None = None, errno: int | None = None,
                 kind: str | None = None) -> None:
        if kind is not None:
            self.kind = kind  # the disk's role ("source", "target") where the class has none
        self.message = message
        self.disk = disk
        self.offset = offset
        self.length = length
        self.errno = errno
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = []
        if self.disk:
            parts.append(f"{self.kind} {self.disk}")
        text = self.message
        if self.offset is not None:
            where = f"at offset {self.offset}"
            if self.length is not None:
                where += f" (length {self.length})"
            text = f"{text} {where}"
        parts.append(text)
        return ": ".join(parts)


class BadInput(TransferError, ValueError):
    """The caller's input is wrong: a URL, an option, a file. Nothing was written."""

    exit_code = 2


class NativeMissing(BadInput):
    """The compiled kernels are not built and the twins were not asked for."""


class TargetRefused(BadInput):
    """The target failed a safety check before the first write; it is untouched."""

    kind = "target"


class SourceError(TransferError):
    """Reading the source failed."""

    exit_code = 3
    kind = "source"


class SourceChanged(SourceError):
    """The source is not the disk it was (its size changed): never retried (RELIABILITY.md S10)."""


class ConnectionLost(SourceError):
    """The source's connection died; its reads in flight are lost and may be issued again."""


class TargetError(TransferError):
    """Writing, zeroing or flushing the target failed."""

    exit_code = 4
    kind = "target"


class StateIOError(TransferError):
    """Writing (or reading) the engine's own state failed: a journal, ranges or manifest file
    on a file system that is full or failing. Not bad input, and writes may have happened: it
    exits with the target's I/O code, because the remedy is the same (fix the storage, run the
    same command again) and what the journal holds stays resumable (RELIABILITY.md R5, R6)."""

    exit_code = 4
    kind = "state"


class Interrupted(TransferError):
    """Stopped by a signal or a cancellation before the end; nothing is claimed done."""

    exit_code = 5
    kind = "interrupted"


class VerifyFailed(TransferError):
    """The target does not hold what the source holds."""

    exit_code = 6
    kind = "verify"


class NotConverging(TransferError):
    """live migration: the guest dirties blocks faster than passes can shrink the delta."""

    exit_code = 7
    kind = "migration"


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: the message has a traceback)",
    BadInput.exit_code: "bad input or refused target (nothing was written)",
    SourceError.exit_code: "source I/O failure",
    TargetError.exit_code: "target I/O failure, or the state directory's (fix it, run again)",
    Interrupted.exit_code: "interrupted (SIGINT/SIGTERM)",
    VerifyFailed.exit_code: "verification failed: the target differs",
    NotConverging.exit_code: "live migration does not converge within --max-downtime",
}
