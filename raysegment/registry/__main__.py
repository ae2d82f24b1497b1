"""``python -m raysegment.registry``: the registry commands (``raysegment.cli.registry``)."""

import sys

from raysegment.cli import run
from raysegment.cli.registry import main

sys.exit(run(main))
