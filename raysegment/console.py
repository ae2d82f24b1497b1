"""What a driver prints of Ray's own processes: the lines that tell a user of a job nothing are
dropped from its console (they stay in Ray's session logs; ``--verbose`` prints them). Base layer,
beside ``runtime``: imports nothing of raysegment (Ray only inside functions)."""

from __future__ import annotations

import re

# Lines Ray's own processes send to the driver's console that tell a user of a job nothing:
# the GCS's ERROR that killing an actor whose process had already exited "failed" (for Ray's
# KillActor the RPC failing is the success path: ray-project/ray PRs 53412 and 58544, the latter
# dropping the same log line elsewhere), Ray Train's placement-group cleaner reporting the
# controller of a trial that Tune (ASHA, or the search's end) stopped, and the raylet's warning that
# it started more worker processes than the node has CPUs (every search of two trials at once on a
# 2-core machine: a Ray Train run is some five actors, each a process), and the ERROR a run's
# preemption watcher gets from the core worker about its own restart policy (ray-project/ray#53727;
# a Ray this process starts runs without the watcher, ``runtime._start_local``, but a cluster's keeps it),
# and the raylet's note, as ``serve`` stops its service (``serve.shutdown()`` kills the controller
# whose graceful_shutdown it called), that the call "failed" and will be retried: every stop printed it.
HARMLESS_RAY_LINES = ("Failed to kill actor", "Detected that the Ray Train controller actor",
                      "PYTHON worker processes have been started on node",
                      "has constructor arguments in the object store and max_restarts > 0",
                      "Task ServeController.graceful_shutdown failed")
# A training worker that Ray kills mid-step (Tune stopping a trial: ASHA, the search's end) can exit
# while torch's threads run: libstdc++ aborts it, and Python's fault handler reports the abort with
# the worker's stack and its 117 extension modules, some 20 lines (ray-project/ray#4013). Seen once
# in the README's search, 2026-12-06. That report, from the first line to the modules' list, goes.
KILLED_MID_STEP = "terminate called without an active exception"
# Ray Train's controller, stopping a run whose workers are gone (a raylet killed: `ray stop`, the
# OOM killer), warns "Graceful shutdown of backend failed. This is expected if one of the workers
# has crashed." with a 15-line traceback; the command's own line says what happened.
BACKEND_SHUTDOWN = "Graceful shutdown of backend failed"
# (first line, last line's start) of the multi-line reports that go whole
_BLOCKS = ((KILLED_MID_STEP, "Extension modules:"), (BACKEND_SHUTDOWN, "ray.exceptions."))
# The dashboard agent's report of a raylet killed outright (``ray stop --force``, the OOM killer)
# carries the raylet log's last 20 lines, indented, in the one message, and reaches the driver
# twice (the GCS's error and the streamed log): its first sentence stays, once; the log lines (in
# the session's raylet.out) go.
RAYLET_DIED = "Raylet is terminated"
_RAYLET_LOG_TAIL = re.compile(r" ?Last \d+ lines of the Raylet logs:.*", re.DOTALL)
# The autoscaler's monitor that `ray stop` ended (SIGTERM) reports its own stack as a failure, one
# 9-line message from the GCS; the command's own line says the Ray went away.
AUTOSCALER_STOPPED = ("The autoscaler failed with the following error:", "Terminated with signal 15")
# A training worker's data prefetcher whose Ray connection broke as its run was stopped (Ctrl-C:
# the driver leaves Ray; a killed raylet) logs "Error in prefetcher thread." and a traceback ending
# in "OSError: Broken pipe" (in CI, 2026-12-07, before the Ctrl-C test's interrupted line). Such a
# report is held to its exception line and goes if that is the broken pipe; any other prints whole.
PREFETCH_FAILED, BROKEN_PIPE = "Error in prefetcher thread.", "OSError: Broken pipe"
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
_HELD_MAX = 60  # lines: a report longer than a traceback is not one; it prints
_FILTERED = "_raysegment_filtered"
_SEEN = "_raysegment_seen"


def _dropping(printer, harmless: tuple[str, ...], seen: set | None = None):
    """``printer(data, …)`` with the lines of ``data`` that hold one of ``harmless`` dropped, a
    process's report that begins as one of ``_BLOCKS`` (to its last line, across batches), a
    prefetcher's broken pipe (held to its exception line, across batches), and a raylet's death
    told again (``seen``: shared by the printers that may tell it); nothing is printed for a batch
    left empty."""
    dropping: dict = {}  # process → the start of its report's last line
    held: dict = {}  # process → the lines of its prefetcher's report so far
    seen = set() if seen is None else seen
    drop = (*harmless, BACKEND_SHUTDOWN)  # once, not per streamed line
    ends = tuple((first, last, f"\n{last}") for first, last in _BLOCKS)

    def hold(pid, line: str) -> list[str] | None:
        """The lines to print now of a held prefetcher report (None: ``line`` is not part of one)."""
        if pid not in held and not line.startswith(PREFETCH_FAILED):
            return None
        held.setdefault(pid, []).append(line)
        if _EXCEPTION_LINE.match(line):
            report = held.pop(pid)
            return [] if line.startswith(BROKEN_PIPE) else report
        return held.pop(pid) if len(held[pid]) > _HELD_MAX else []

    def filtered(data: dict, *args, **kwargs) -> None:
        lines, pid = [], data.get("pid")
        for line in data.get("lines", ()):
            if (now := hold(pid, line)) is not None:
                lines.extend(now)
                continue
            for first, last, inside in ends:
                if line.startswith(first) and inside not in line:  # a report in one string goes whole below
                    dropping[pid] = last
            if pid in dropping:
                if line.startswith(dropping[pid]):
                    del dropping[pid]
            elif RAYLET_DIED in line:
                if RAYLET_DIED not in seen:
                    seen.add(RAYLET_DIED)
                    lines.append(_RAYLET_LOG_TAIL.sub("", line))
            elif not any(h in line for h in drop) and not all(
                    a in line for a in AUTOSCALER_STOPPED):
                lines.append(line)
        if lines or not data.get("lines"):
            printer({**data, "lines": lines}, *args, **kwargs)

    setattr(filtered, _FILTERED, True)
    return filtered


def quiet_driver_logs(harmless: tuple[str, ...] = HARMLESS_RAY_LINES) -> bool:
    """Drop the lines holding one of ``harmless``, and the abort report of a worker killed mid-step,
    from what this driver prints of Ray's processes: their streamed output (the handler ``ray.init``
    gives Ray's dispatcher) and the errors the GCS pushes to the driver (the raylet's, printed by
    ``ray._private.worker.print_to_stdstream``). Every other line prints as before. → whether the
    handler was found (a Ray without it keeps printing everything)."""
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    # a raylet's death reaches the driver on both paths: one record of it for both
    seen: set = getattr(ray_worker.print_to_stdstream, _SEEN, set())
    if not getattr(ray_worker.print_to_stdstream, _FILTERED, False):
        ray_worker.print_to_stdstream = _dropping(ray_worker.print_to_stdstream, harmless, seen)
        setattr(ray_worker.print_to_stdstream, _SEEN, seen)
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name != "ray_print_logs":
                continue
            if not getattr(handler, _FILTERED, False):
                dispatcher.handlers[i] = (name, _dropping(handler, harmless, seen))
            return True
    return False
