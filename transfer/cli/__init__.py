"""The command line, `transfer VERB ...`: main() parses, runs the verb, maps errors to exit codes.

main.py holds the parser and the error mapping, options.py the options verbs share
(declared once, defaults from the engine's constants), output.py what verbs print and
write, and one module per verb (or pair of verbs) its options and its command.
"""

from .main import main
from .options import parse_size

__all__ = ["main", "parse_size"]
