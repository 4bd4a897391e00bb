"""Progress rendering: a bar on a terminal, JSON lines for a pod, or nothing."""

from .progress import JsonProgress, TerminalBar, human_bytes, make_renderer

__all__ = ["JsonProgress", "TerminalBar", "human_bytes", "make_renderer"]
