"""``raysegment.runtime``'s process helpers: finding one Ray's processes by a marker in their
environment or command line, and stopping those only (others on the machine live on)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

from raysegment.runtime import find_processes, stop_processes


def _sleeper(env_marker: str = "", ignore_term: bool = False) -> subprocess.Popen:
    code = "import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "") + \
        "print('up', flush=True)\ntime.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "RS_TEST_MARK": env_marker},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"  # handler installed before anyone signals it
    return proc


def test_stop_processes_stops_the_marked_ones_only_and_kills_those_that_ignore_sigterm():
    mark = secrets.token_hex(8)
    ours, stubborn, other = _sleeper(mark), _sleeper(mark, ignore_term=True), _sleeper("someone-else")
    try:
        match = lambda cmdline, environ: f"RS_TEST_MARK={mark}".encode() in environ  # noqa: E731
        assert sorted(find_processes(match)) == sorted([ours.pid, stubborn.pid])
        stop_processes(match, grace_s=1.0)
        assert ours.wait(5) == -signal.SIGTERM and stubborn.wait(5) == -signal.SIGKILL
        assert other.poll() is None and find_processes(match) == []
    finally:
        for p in (ours, stubborn, other):
            p.kill()
            p.wait()
