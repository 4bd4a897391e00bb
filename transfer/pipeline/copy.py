"""The copy engine's old home; it lives in engine.py now (and Progress in observe.events)."""

# re-export (issue 13): importers move to pipeline.engine
from ..observe.events import Progress
from .engine import RETRIES, Result, run

__all__ = ["Progress", "RETRIES", "Result", "run"]
