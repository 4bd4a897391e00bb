"""What the engine reports while it runs, for the renderers in progress.py and for callers.

The pipeline emits these (it imports this module; this package never imports
the pipeline), so a renderer depends on the event, not on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    done: int
    total: int
    seconds: float
    final: bool = False
    retries: int = 0  # reads issued again after an error or a lost connection
    reconnects: int = 0
    stalled: float = 0.0  # seconds since done last grew (S5: a silent server shows here)
    phase: str = "copy"  # or "read-back": the target read back against the manifest

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


__all__ = ["Progress"]
