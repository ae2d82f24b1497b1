"""``python -m raysegment.tune``: the command's stable name; its code is ``raysegment.cli.tune``.

Imports only that module (and nothing when imported as a library path by old code).
"""

import sys

from raysegment.cli.tune import build_parser, main  # noqa: F401

if __name__ == "__main__":
    from raysegment.cli import run

    sys.exit(run(main))
