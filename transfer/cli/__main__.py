"""python -m transfer.cli VERB ...: the console script `transfer`."""

from .main import entry

entry()
