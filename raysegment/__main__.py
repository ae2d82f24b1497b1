"""``python -m raysegment [COMMAND …]``: the ``raysegment`` console script (``raysegment.cli.main``),
for a venv whose scripts folder is not on PATH."""

import sys

from raysegment.cli.main import main

sys.exit(main())
