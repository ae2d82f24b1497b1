"""What a command says when the Ray under it goes away (``ray stop``, the head node gone, the OOM
killer): one ``error:`` line saying what is kept and when the same command goes on, in place of
Ray's 40-line traceback or its minute of waiting that ends in a C++ log line. Top layer: imports
``raysegment.runtime`` only (Ray's modules only as this process already holds them)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from raysegment.runtime import ClusterUnreachable, check_cluster

# Ray's detail when an actor this driver owns died because the driver's own node (its raylet) did.
OWN_NODE_CRASHED = "Owner's node has crashed"
# How long a cluster's GCS may not answer before the command ends: a GCS with fault tolerance
# restarts within it; Ray's driver waits 60 s (gcs_rpc_server_reconnect_timeout_s) and then ends
# the process with a C++ log line. A Ray this process started cannot come back.
JOINED_GRACE_S = 50.0
LOCAL_GRACE_S = 3.0
# This node's raylet is asked this often (s), and two misses end the command: Ray's core worker ends
# the process about a second after its raylet's death, so a slower watch lost that race at times
# (the killed-raylet test, once, at ec3041e: Ray's lines last, not ours).
RAYLET_EVERY_S = 0.25

Lost = tuple[str, bool]  # (the GCS address, whether this process started that Ray)


def _node() -> tuple[Lost, tuple[str, ...]] | None:
    """(this driver's Ray, the addresses that answer while it is up: its GCS and this node's raylet)."""
    try:
        worker = sys.modules["ray._private.worker"].global_worker
        node = worker.node if worker.connected else None
        return (node.gcs_address, bool(node.head)), (node.gcs_address, f"{node.node_ip_address}:{node.node_manager_port}")
    except (KeyError, AttributeError):  # Ray not imported, or never connected
        return None


def _answers(addresses: tuple[str, ...]) -> bool:
    try:
        for address in addresses:
            check_cluster(address)
    except ClusterUnreachable:
        return False
    return True


def lost_cluster(exc: BaseException, wait_s: float = 3.0) -> tuple[Lost, str] | None:
    """(the Ray that went away, why) when ``exc`` is a Ray error that says this driver's node crashed
    (``ray stop``: ``ActorDiedError … Owner's node has crashed``, in a 40-line traceback), or after
    which the GCS or this node's raylet stops answering within ``wait_s`` (s; ``ray stop --force``:
    ``ActorUnavailableError``); None otherwise (another error, a cluster that answers). Ray's own
    message is taken at once: the core worker ends this process about a second after its raylet's
    death, and while ``ray stop`` is at work the ports may still answer."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is None or not isinstance(exc, ray_exceptions.RayError) or (node := _node()) is None:
        return None
    lost, addresses = node
    if OWN_NODE_CRASHED in str(exc):
        return lost, "this node's raylet ended"
    deadline = time.monotonic() + wait_s
    while _answers(addresses):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.25)
    return lost, "its raylet or GCS stopped answering"


def exit_now(line: str) -> None:
    """Print ``line`` last and end the process, exit 1: its Ray is gone, and the controller's and
    Tune's tracebacks would print after it while Ray shuts down (or Ray ends it first)."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(1)


def cluster_gone(lost: Lost, why: str) -> tuple[str, str]:
    """(what went away, when the same command goes on), for the line a command ends with."""
    address, started_here = lost
    why = f"{why}: `ray stop`, a crash or the OOM killer"
    if started_here:
        return f"the local Ray this command started went away ({why})", ""
    return f"the Ray cluster at {address} went away ({why})", "once the cluster is up again, "


class _LostInRecord(logging.Filter):
    """On a record whose exception is ``lost_cluster``'s (Tune's "Trial task failed" ERROR with its
    traceback; after `ray stop` the core worker ends the process some 50 ms later): ``end`` instead
    of the record. A trial's own error costs the record up to 0.5 s of asking."""

    def __init__(self, end: Callable[[Lost, str], None]):
        super().__init__()
        self.end = end

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (gone := lost_cluster(record.exc_info[1], wait_s=0.5)):
            self.end(*gone)
        return True


@contextlib.contextmanager
def watch_cluster(say: Callable[[Lost, str], str], loggers: tuple[str, ...] = (), every_s: float = 1.0):
    """While the body runs, ask this driver's GCS every ``every_s`` (s) whether it answers (from
    when the body has joined Ray); when it has not for ``LOCAL_GRACE_S`` (a Ray this process
    started) or ``JOINED_GRACE_S`` (a cluster's), when this node's raylet has not answered twice in a
    row (asked every ``RAYLET_EVERY_S``), or when a record of one of ``loggers`` says the Ray is
    gone, print ``say(lost, why)`` once, last, and end the process, exit 1. Ray's own way is slower
    and says less: a search (Tune waits for resources), a batch, or a run whose raylet was killed
    waits 60 s and ends in ``rpc_client.h: Failed to connect to GCS within 60 seconds``; a search
    whose raylet was stopped ends in Tune's trial traceback."""
    stop, said, node = threading.Event(), threading.Lock(), _node()

    def end(lost: Lost, why: str) -> None:
        if said.acquire(blocking=False):
            exit_now(say(lost, why))

    def watch() -> None:
        nonlocal node
        since, misses, asked_gcs = None, 0, 0.0
        while not stop.wait(min(every_s, RAYLET_EVERY_S)):
            node = node or _node()
            if node is None:  # not joined yet
                continue
            lost, addresses = node
            misses = 0 if _answers(addresses[1:]) else misses + 1  # this node's raylet
            if misses >= 2 and not stop.is_set():
                end(lost, "this node's raylet ended")
            if misses or time.monotonic() - asked_gcs < every_s:
                continue
            asked_gcs = time.monotonic()
            grace = LOCAL_GRACE_S if lost[1] else JOINED_GRACE_S
            if _answers((lost[0],)):  # the GCS
                since = None
                continue
            if since is None and not lost[1]:
                print(f"[raysegment] the Ray cluster at {lost[0]} does not answer; waiting up to {grace:.0f} s "
                      f"for it", file=sys.stderr, flush=True)
            since = since or time.monotonic()
            if time.monotonic() - since >= grace and not stop.is_set():
                end(lost, f"its GCS has not answered for {grace:.0f} s")

    guard = _LostInRecord(end)
    for name in loggers:
        logging.getLogger(name).addFilter(guard)
    threading.Thread(target=watch, name="raysegment-cluster-watch", daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        for name in loggers:
            logging.getLogger(name).removeFilter(guard)
