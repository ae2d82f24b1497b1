"""``python -m raysegment.registry``: the registry commands (``raysegment.cli.registry``)."""

import sys

from raysegment.cli.registry import main

sys.exit(main())
