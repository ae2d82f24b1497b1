"""The command lines: thin argparse layers over the stages' functions, shared argument checks
(``args``), benchmarks (``bench``, ``gpu_smoke``) and the ``raysegment`` console script (``main``).

The top layer: may import every stage; nothing imports it. This file itself imports only the
standard library (every command's shim imports it).
"""

import sys

INTERRUPTED = 130  # a shell's exit status for a process ended by Ctrl-C (128 + SIGINT)


def run(main, argv: list[str] | None = None) -> int:
    """A command's ``main(argv)``; a Ctrl-C that the command does not handle itself (train, tune,
    infer and prepare say what they keep) ends it with one ``interrupted:`` line and exit status
    130 instead of a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted: stopped before it finished", file=sys.stderr, flush=True)
        return INTERRUPTED
