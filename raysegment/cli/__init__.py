"""The command lines: thin argparse layers over the stages' functions, shared argument checks
(``args``), benchmarks (``bench``, ``gpu_smoke``) and the ``raysegment`` console script (``main``).

The top layer: may import every stage; nothing imports it. This file itself imports only the
standard library and ``raysegment.runtime`` (every command's shim imports it, before Ray).
"""

import argparse
import sys
import textwrap

from raysegment.runtime import ClusterUnreachable, disable_telemetry

# Every command's telemetry switch (they do not call it again), here so that it comes before any
# command module imports Ray: Ray reads RAY_DISABLE_FAILURE_SIGNAL_HANDLER when it is imported, and
# ``train`` imports it with its own module (its SIGTERM then still aborted the driver).
disable_telemetry()

INTERRUPTED = 130  # a shell's exit status for a process ended by Ctrl-C (128 + SIGINT)


def run(main, argv: list[str] | None = None) -> int:
    """A command's ``main(argv)``; a Ctrl-C or SIGTERM that the command does not handle itself (train,
    tune, infer and prepare say what they keep) ends it with one ``interrupted:`` line and exit
    status 130 instead of a traceback, a Ray cluster that refuses it with one ``error:`` line and 1."""
    import signal
    import threading

    # SIGTERM (a scheduler's stop, `kill`) as Ctrl-C, so what a command cleans up on Ctrl-C is
    # cleaned up then too (prepare's temporary folder was left); a command that starts Ray gets
    # Ray's handler instead, which raises SystemExit (``runtime.stop_signal``). Python allows
    # handlers in the main thread only.
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted: stopped before it finished", file=sys.stderr, flush=True)
        return INTERRUPTED
    except ClusterUnreachable as exc:  # the Ray cluster a command joins (an environment fault)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors are two lines, the error last: argparse's own usage of
    ``train`` or ``tune`` is some 30 lines above the one that says what is wrong."""

    def error(self, message: str):
        commands = [",".join(a.choices) for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        usage = " ".join([self.prog, *(f"{{{c}}}" for c in commands), "[options]"])
        self.exit(2, f"usage: {usage}   (--help lists them)\n{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        """``--help`` with each option's default (what the configs give) where it has one."""
        for action in self._actions:
            _show_default(action)
        return super().format_help()


def _show_default(action: argparse.Action) -> None:
    """Append ``(default: X)`` to an option's help, unless it has none, is a switch (``--gpu``), or its
    help already says what the default is."""
    value = action.default
    if not action.option_strings or action.nargs == 0 or action.help is argparse.SUPPRESS:
        return
    if value is None or value is False or value in ("", [], ()) or value is argparse.SUPPRESS or "default" in (action.help or ""):
        return
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    shown = shown.replace("%", "%%")  # argparse %-formats help strings
    action.help = f"{action.help} (default: {shown})" if action.help else f"default: {shown}"


def add_in_plane_argument(p: argparse.ArgumentParser) -> None:
    """``--in-plane`` of the commands that segment users' studies (``infer``, ``serve``)."""
    from raysegment.config import IN_PLANE_CHOICES

    p.add_argument("--in-plane", default="auto", choices=IN_PLANE_CHOICES,
                   help="turn each study before the networks and its masks back: 'auto' takes, per study, as stored "
                        "or rows reversed, whichever the models segment with more confidence (NIfTI converters "
                        "differ in the way rows run; the models learnt ACDC's orientation alone)")


def command_parser(name: str, description: str, *examples: str) -> argparse.ArgumentParser:
    """The parser of ``python -m raysegment.NAME``: ``--help`` shows what the command does and
    ``examples`` (a module's docstring is for developers and is not shown)."""
    text = "\n\n".join(textwrap.fill(" ".join(part.split()), 88, break_on_hyphens=False) for part in description.split("\n\n"))
    epilog = ("examples:\n" + "\n".join(f"  {line}" for line in examples)) if examples else None
    return CommandParser(prog=f"python -m raysegment.{name}", description=text, epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
