"""``python -m raysegment.serve``: the command's stable name; its code is ``raysegment.cli.serve``.

Imports only that module.
"""

import sys

from raysegment.cli.serve import build_parser, main  # noqa: F401

if __name__ == "__main__":
    from raysegment.cli import run

    sys.exit(run(main))
