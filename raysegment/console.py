"""What a driver prints of Ray's own processes: the lines that tell a user of a job nothing are
dropped from its console (they stay in Ray's session logs; ``--verbose`` prints them). Base layer,
beside ``runtime``: imports nothing of raysegment (Ray only inside functions)."""

from __future__ import annotations

# Lines Ray's own processes send to the driver's console that tell a user of a job nothing:
# the GCS's ERROR that killing an actor whose process had already exited "failed" (for Ray's
# KillActor the RPC failing is the success path: ray-project/ray PRs 53412 and 58544, the latter
# dropping the same log line elsewhere), Ray Train's placement-group cleaner reporting the
# controller of a trial that Tune (ASHA, or the search's end) stopped, and the raylet's warning that
# it started more worker processes than the node has CPUs (every search of two trials at once on a
# 2-core machine: a Ray Train run is some five actors, each a process), and the ERROR a run's
# preemption watcher gets from the core worker about its own restart policy (ray-project/ray#53727;
# a Ray this process starts runs without the watcher, ``runtime._start_local``, but a cluster's keeps it).
HARMLESS_RAY_LINES = ("Failed to kill actor", "Detected that the Ray Train controller actor",
                      "PYTHON worker processes have been started on node",
                      "has constructor arguments in the object store and max_restarts > 0")
# A training worker that Ray kills mid-step (Tune stopping a trial: ASHA, the search's end) can exit
# while torch's threads run: libstdc++ aborts it, and Python's fault handler reports the abort with
# the worker's stack and its 117 extension modules, some 20 lines (ray-project/ray#4013). Seen once
# in the README's search, 2026-12-06. That report, from the first line to the modules' list, goes.
KILLED_MID_STEP = "terminate called without an active exception"
_REPORT_END = "Extension modules:"
_FILTERED = "_raysegment_filtered"


def _dropping(printer, harmless: tuple[str, ...]):
    """``printer(data, …)`` with the lines of ``data`` that hold one of ``harmless`` dropped, and a
    process's abort report after ``KILLED_MID_STEP`` (nothing printed for a batch left empty)."""
    aborting: set = set()  # the processes whose report is being dropped (it may span batches)

    def filtered(data: dict, *args, **kwargs) -> None:
        lines, pid = [], data.get("pid")
        for line in data.get("lines", ()):
            if line.startswith(KILLED_MID_STEP):
                aborting.add(pid)
            if pid in aborting:
                if line.startswith(_REPORT_END):
                    aborting.discard(pid)
            elif not any(h in line for h in harmless):
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
    if not getattr(ray_worker.print_to_stdstream, _FILTERED, False):
        ray_worker.print_to_stdstream = _dropping(ray_worker.print_to_stdstream, harmless)
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name != "ray_print_logs":
                continue
            if not getattr(handler, _FILTERED, False):
                dispatcher.handlers[i] = (name, _dropping(handler, harmless))
            return True
    return False
