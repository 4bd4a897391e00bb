"""python -m transfer.cli VERB ...: the console script `transfer`."""

import sys

from .main import main

sys.exit(main())
