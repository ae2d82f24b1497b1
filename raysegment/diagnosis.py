"""``python -m raysegment.diagnosis``: the command's stable name; its code is ``raysegment.cli.diagnosis``.

Imports only that module (and nothing when imported as a library path by old code).
"""

import sys

from raysegment.analysis.diagnosis import FEATURES, DiagnosisModel  # noqa: F401  (registered pyfunc code)
from raysegment.cli.diagnosis import build_parser, main  # noqa: F401

if __name__ == "__main__":
    from raysegment.cli import run

    sys.exit(run(main))
