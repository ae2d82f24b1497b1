"""A command whose Ray goes away under it (``raysegment.cli.lost``): one ``error:`` line, last,
saying what is kept and when the same command goes on. The real case (a run's raylet killed) is
the slow train test; these drive the rules with a stand-in for Ray's worker module."""

import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from raysegment.cli import lost


def _fake_node(monkeypatch, gcs: str, raylet: str, head: bool):
    host, port = raylet.rsplit(":", 1)
    node = SimpleNamespace(gcs_address=gcs, head=head, node_ip_address=host, node_manager_port=int(port))
    worker = SimpleNamespace(node=node, connected=True)
    monkeypatch.setitem(sys.modules, "ray._private.worker", SimpleNamespace(global_worker=worker))


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_a_ray_error_counts_as_a_lost_cluster_only_when_ray_says_so_or_it_stops_answering(monkeypatch):
    import ray.exceptions

    with socket.create_server(("127.0.0.1", 0)) as up:
        alive = f"127.0.0.1:{up.getsockname()[1]}"
        _fake_node(monkeypatch, alive, alive, head=False)
        crashed = ray.exceptions.RaySystemError("The actor is dead … Worker exit detail: Owner's node has crashed.")
        assert lost.lost_cluster(crashed) == ((alive, False), "this node's raylet ended")  # Ray's word, at once
        assert lost.lost_cluster(ray.exceptions.RaySystemError("a task failed"), wait_s=0.3) is None  # it answers
        assert lost.lost_cluster(ValueError("Owner's node has crashed")) is None  # not Ray's error
        _fake_node(monkeypatch, alive, _closed_port(), head=True)  # the raylet is gone, the GCS not yet
        assert lost.lost_cluster(ray.exceptions.RaySystemError("unavailable"), wait_s=0.3) == (
            (alive, True), "its raylet or GCS stopped answering")
    monkeypatch.setitem(sys.modules, "ray._private.worker", SimpleNamespace())  # never connected
    assert lost.lost_cluster(crashed) is None
    _fake_node(monkeypatch, "127.0.0.1:1", "127.0.0.1:1", head=True)
    sys.modules["ray._private.worker"].global_worker.connected = False  # left Ray: its node is no more
    assert lost.lost_cluster(crashed) is None


def test_what_a_command_says_of_a_local_ray_and_of_a_cluster():
    what, when = lost.cluster_gone(("10.0.0.1:6379", False), "this node's raylet ended")
    assert what == "the Ray cluster at 10.0.0.1:6379 went away (this node's raylet ended: `ray stop`, a crash or the OOM killer)"
    assert when == "once the cluster is up again, "
    what, when = lost.cluster_gone(("10.0.0.1:6379", True), "x")
    assert what.startswith("the local Ray this command started went away (x: ") and when == ""


WATCHED = textwrap.dedent("""
    import logging, socket, sys, time
    from types import SimpleNamespace
    from raysegment.cli import lost
    import ray.exceptions

    gcs, raylet = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{gcs.getsockname()[1]}"
    node = SimpleNamespace(gcs_address=address, head=sys.argv[1] == "local", node_ip_address="127.0.0.1",
                           node_manager_port=raylet.getsockname()[1])
    sys.modules["ray._private.worker"] = SimpleNamespace(global_worker=SimpleNamespace(node=node, connected=True))
    lost.LOCAL_GRACE_S, lost.JOINED_GRACE_S = 0.5, 1.0
    say = lambda lost_, why: f"error: run r stopped: {lost_[0] == address} {lost_[1]} {why}"
    with lost.watch_cluster(say, loggers=("tune",), every_s=0.1):
        print("running", flush=True)
        time.sleep(0.5)
        if sys.argv[2] == "log":  # Tune's record of a trial whose owner's node crashed
            try:
                raise ray.exceptions.RaySystemError("Worker exit detail: Owner's node has crashed.")
            except ray.exceptions.RaySystemError:
                logging.getLogger("tune").error("Trial task failed", exc_info=True)
        else:
            (gcs if sys.argv[2] == "gcs" else raylet).close()
        time.sleep(10)
    print("not reached", flush=True)
""")


@pytest.mark.parametrize("ray_kind, how, last", [
    ("local", "gcs", "error: run r stopped: True True its GCS has not answered for 0 s"),
    ("joined", "gcs", "error: run r stopped: True False its GCS has not answered for 1 s"),
    ("joined", "log", "error: run r stopped: True False this node's raylet ended"),
    # the core worker ends the process about a second after its raylet's death: asked 4 times a second
    ("local", "raylet", "error: run r stopped: True True this node's raylet ended"),
    ("joined", "raylet", "error: run r stopped: True False this node's raylet ended"),
])
def test_the_watch_ends_the_process_with_the_commands_line_last(ray_kind, how, last):
    run = subprocess.run([sys.executable, "-c", WATCHED, ray_kind, how], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout == "running\n", run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == last and sum(line.startswith("error:") for line in lines) == 1, run.stderr
    # a cluster's GCS may come back (one that fails over): the wait is said; a Ray of this process's cannot
    assert ("does not answer; waiting up to 1 s" in run.stderr) == ((ray_kind, how) == ("joined", "gcs")), run.stderr
    assert "Trial task failed" not in run.stderr  # the record that said it was not printed: the line instead
