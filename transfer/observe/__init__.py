"""Progress: the engine's events (events.py) and their renderers (progress.py): a bar on a
terminal, JSON lines for a pod, or nothing."""

from .events import Progress
from .progress import JsonProgress, TerminalBar, human_bytes, make_renderer

__all__ = ["JsonProgress", "Progress", "TerminalBar", "human_bytes", "make_renderer"]
