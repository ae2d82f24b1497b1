"""``raysegment.runtime``'s process helpers: finding one Ray's processes by a marker in their
environment or command line, and stopping those only (others on the machine live on); the
process group that the servers and drivers we start get."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

from raysegment.runtime import (
    OWN_PROCESS_GROUP,
    clear_stale_scratch,
    find_processes,
    free_ports,
    scratch_dir,
    stale_scratch,
    stop_processes,
)


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


def test_a_process_holding_a_file_open_in_the_folder_is_found_and_stopped(tmp_path):
    """Ray's agents rename themselves and drop the environment that marks them, but keep their logs
    in the cluster's temp dir open: that finds them (a process with a file in a sibling folder is not)."""
    ours, other = tmp_path / "rs-ours", tmp_path / "rs-ours-not"
    procs = []
    for folder in (ours, other):
        folder.mkdir()
        code = f"f = open({str(folder / 'agent.log')!r}, 'w')\nprint('up', flush=True)\nimport time; time.sleep(60)"
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True))
        assert procs[-1].stdout.readline().strip() == "up"
    try:
        nothing = lambda cmdline, environ: False  # noqa: E731
        assert find_processes(nothing, holding=str(ours)) == [procs[0].pid]
        stop_processes(nothing, grace_s=1.0, holding=str(ours) + "/")
        assert procs[0].wait(5) == -signal.SIGTERM and procs[1].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_local_ray_that_times_out_at_start_is_started_once_more_on_a_new_port(monkeypatch, capsys):
    """Ray waits a fixed 30 s for its raylet (a machine busy with training can take longer): the
    local start is tried again, on a fresh GCS port, after shutting the half-started one down;
    any other failure, or a second timeout, is raised as it is."""
    import pytest
    import ray

    from raysegment import runtime

    calls, shutdowns = [], []

    def fake_init(**kwargs):
        calls.append(os.environ["RAY_GCS_SERVER_PORT"])
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # what Ray's processes inherit
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(len(calls)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    runtime._start_local(None, None)
    assert len(calls) == 2 and calls[0] != calls[1] and shutdowns == [1]
    assert "starting it again (2 of 2)" in capsys.readouterr().err
    assert "RAY_ADDRESS" not in os.environ and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # as it was

    def always_times_out(**kwargs):
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", always_times_out)
    with pytest.raises(Exception, match="timed out during startup"):
        runtime._start_local(None, None)

    def other_failure(**kwargs):
        raise ValueError("bad num_cpus")

    monkeypatch.setattr(ray, "init", other_failure)
    shutdowns.clear()
    with pytest.raises(ValueError, match="bad num_cpus"):
        runtime._start_local(None, None)
    assert shutdowns == []


def test_own_process_group_stays_in_this_session_and_killpg_stops_the_child_with_its_own():
    """A server or driver started with ``OWN_PROCESS_GROUP``: its own process group (os.killpg stops
    it and what it started; a terminal's Ctrl-C does not reach it) in this session, not a new one,
    which on Linux is a scheduler autogroup of its own that starves beside a training run."""
    code = "import subprocess, sys, time\n" \
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n" \
        "print(c.pid, flush=True)\ntime.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **OWN_PROCESS_GROUP)
    try:
        grandchild = int(proc.stdout.readline())
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        assert os.getsid(proc.pid) == os.getsid(0)
        assert os.getpgid(grandchild) == proc.pid
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
        deadline = time.time() + 10
        while _alive(grandchild) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(grandchild)
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_free_ports_are_distinct_and_bindable():
    """``free_ports(n)``: n different ports, each free to bind afterwards (the test servers give
    `ray start` several at once; two equal ones failed a CI run: "metrics_export is trying to use a
    port number ... used by other components")."""
    import socket

    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_scratch_of_a_dead_process_is_cleared_and_a_live_ones_stays(tmp_path):
    """What a killed process left in ``scratch_dir`` goes at the next ``clear_stale_scratch``; the
    folders of live processes (this one's, open now) and other names stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"rs-test-{dead.pid}-abc").mkdir()
    (tmp_path / f"rs-test-{dead.pid}-abc" / "upload.nii.gz").write_bytes(b"x")
    (tmp_path / "rs-test-notapid-x").mkdir()
    (tmp_path / f"other-{dead.pid}-x").mkdir()
    with scratch_dir("rs-test-", tmp_path) as live:
        assert live.name.startswith(f"rs-test-{os.getpid()}-")
        assert stale_scratch("rs-test-", tmp_path) == [tmp_path / f"rs-test-{dead.pid}-abc"]
        assert clear_stale_scratch("rs-test-", tmp_path) == 1
        assert live.is_dir()
    assert not live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"other-{dead.pid}-x", "rs-test-notapid-x"]


def test_the_driver_drops_rays_harmless_lines_and_prints_the_rest():
    """``quiet_driver_logs`` wraps the handler Ray's driver prints streamed process output with (in
    Ray's own dispatcher, as ``ray.init`` installs it) and the printer of the errors the GCS pushes
    to the driver: the GCS's "Failed to kill actor … Socket closed", the placement-group cleaner's
    dead-controller warning, the preemption watcher's restart-policy ERROR, the raylet's count of
    started workers, its note on the Serve controller's shutdown call and the abort report of a
    worker killed mid-step go, other lines of the same batch stay, a batch left empty prints
    nothing, and wrapping twice filters once."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from raysegment.console import quiet_driver_logs

    printed, saved = [], dispatcher.handlers  # a Ray an earlier test left running keeps its own
    saved_print = ray_worker.print_to_stdstream
    dispatcher.handlers = [("ray_print_logs", lambda data: printed.append(data["lines"]))]
    ray_worker.print_to_stdstream = lambda data, ignore_prefix: printed.append(data["lines"])
    try:
        assert quiet_driver_logs() and quiet_driver_logs()
        gcs = ("[2026-12-06 13:45:02,621 E 19021 19021] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
               "62a7, return status: Invalid: KillActor RPC failed for actor 62a7: RpcError: RPC error: Socket closed")
        cleaner = ("WARNING placement_group_cleaner.py:120 -- Detected that the Ray Train controller actor (9912) is "
                   "dead. Cleaning up placement group")
        raylet = ("WARNING: 8 PYTHON worker processes have been started on node: 1e75 with address: 192.0.2.2, which "
                  "is 4x the maximum expected startup concurrency (2). This could be a result of using a large number")
        # a run's controller on a cluster that Ray Train's preemption watcher runs on (2026-12-06)
        watcher = ("[2026-12-06 19:56:04,413 E 23584 23613] core_worker.cc:2465: Actor with class name: "
                   "'PreemptionWatcher' and ID: '35076ec352fcafa5da3a1cbf01000000' has constructor arguments in the "
                   "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
                   "lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
        dispatcher.emit({"pid": "gcs_server", "is_err": True, "lines": [gcs]})
        dispatcher.emit({"pid": 23584, "is_err": True, "lines": [watcher]})
        # every stop of `serve` (2026-12-07): serve.shutdown() kills the controller it asked to shut down
        dispatcher.emit({"pid": "raylet", "is_err": True, "lines": [
            "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task will be "
            "retried. Error: The actor is dead because it was killed by `ray.kill`."]})
        # a training worker that Tune's stop killed mid-step: its abort report, over two batches,
        # goes; a crash of another kind (pid 12) and what the killed one's neighbour prints stay
        dispatcher.emit({"pid": 11, "is_err": True, "lines": [
            "terminate called without an active exception", "Fatal Python error: Aborted", "",
            "Stack (most recent call first):"]})
        dispatcher.emit({"pid": 12, "is_err": True, "lines": ["Fatal Python error: Segmentation fault"]})
        dispatcher.emit({"pid": 11, "is_err": True, "lines": [
            '  File "/x/raysegment/training/core.py", line 40 in train_step', "",
            "Extension modules: msgpack._cmsgpack, torch._C (total: 2)"]})
        dispatcher.emit({"pid": 11, "is_err": False, "lines": ["after the report"]})  # the drop ends with it
        dispatcher.emit({"pid": 7, "is_err": True, "lines": [cleaner, "[raysegment] epoch 1/3 loss 0.06", gcs]})
        dispatcher.emit({"pid": 7, "is_err": False, "lines": ["Traceback (most recent call last):"]})
        # as Ray's thread that listens for the GCS's errors prints them (listen_error_messages)
        ray_worker.print_to_stdstream({"lines": [raylet], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        ray_worker.print_to_stdstream({"lines": ["another error"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        dispatcher.handlers = saved
        ray_worker.print_to_stdstream = saved_print
    assert printed == [["Fatal Python error: Segmentation fault"], ["after the report"], ["[raysegment] epoch 1/3 loss 0.06"],
                       ["Traceback (most recent call last):"], ["another error"]]


def test_a_killed_raylet_is_told_once_in_one_sentence_and_the_controllers_shutdown_report_goes():
    """A raylet killed outright (``ray stop --force``, the OOM killer; seen 2026-12-06): the dashboard
    agent's report reached the driver twice, on both paths, each with the raylet log's last 20 lines
    (44 lines); Ray Train's controller then warned "Graceful shutdown of backend failed" with a
    15-line traceback; `ray stop` ended the autoscaler's monitor, which reported its stack as a
    failure. Now the report's first sentence prints once and the other two go whole."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from raysegment.console import quiet_driver_logs

    printed, saved = [], dispatcher.handlers
    saved_print = ray_worker.print_to_stdstream
    dispatcher.handlers = [("ray_print_logs", lambda data: printed.append(data["lines"]))]
    ray_worker.print_to_stdstream = lambda data, ignore_prefix: printed.append(data["lines"])
    died = ("Raylet is terminated. Termination is unexpected. Possible reasons include: (1) SIGKILL by the user or "
            "system OOM killer, (2) Invalid memory access from Raylet causing SIGSEGV or SIGBUS, (3) Other termination "
            "signals. Last 20 lines of the Raylet logs:\n    [2026-12-06 22:53:50,020 I 2366 2366] (raylet) "
            "node_manager.cc:3647: Received KillLocalActor RPC\n    [2026-12-06 22:53:50,063 I 2366 2366] (raylet) x\n")
    try:
        dispatcher.handlers = []  # before ray.init: only the GCS's errors' printer is there to wrap
        assert not quiet_driver_logs()
        dispatcher.handlers = [("ray_print_logs", lambda data: printed.append(data["lines"]))]
        assert quiet_driver_logs()  # after it: the streamed output's handler too, sharing what was seen
        ray_worker.print_to_stdstream({"lines": [died], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        dispatcher.emit({"pid": 5, "is_err": True, "lines": [
            "Graceful shutdown of backend failed. This is expected if one of the workers has crashed.",
            "Traceback (most recent call last):", '  File "/x/ray/train/torch/config.py", line 333, in on_shutdown']})
        dispatcher.emit({"pid": 5, "is_err": True, "lines": [
            "    ray.get(futures, timeout=timeout_s)",
            "ray.exceptions.ActorUnavailableError: The actor 867a is unavailable: Connection refused", "next"]})
        dispatcher.emit({"pid": "dashboard_agent", "is_err": True, "lines": [died]})  # the second copy
        # `ray stop` (SIGTERM) ends the autoscaler's monitor, which reports its stack as a failure
        stopped = ("The autoscaler failed with the following error:\nTerminated with signal 15\n  File \"/x/ray/"
                   "autoscaler/_private/monitor.py\", line 751, in <module>\n    monitor.run()\n")
        ray_worker.print_to_stdstream({"lines": [stopped], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        ray_worker.print_to_stdstream({"lines": ["The autoscaler failed with the following error:\nValueError: x"],
                                       "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        dispatcher.handlers = saved
        ray_worker.print_to_stdstream = saved_print
    assert printed == [[died.split(" Last 20 lines")[0]], ["next"],
                       ["The autoscaler failed with the following error:\nValueError: x"]]  # a real failure stays


def test_a_prefetchers_broken_pipe_goes_and_its_other_errors_print_whole():
    """A training worker's data prefetcher whose Ray connection broke as its run was stopped logs
    "Error in prefetcher thread." with a traceback ending in ``OSError: Broken pipe``: it printed
    before the Ctrl-C test's interrupted line in CI (2026-12-07). That report goes, across batches;
    a prefetcher's other error prints whole, and the lines around both stay."""
    from raysegment.console import _dropping

    printed = []
    filtered = _dropping(lambda data: printed.append(data["lines"]), ())
    trace = ["Traceback (most recent call last):", '  File "/x/ray/data/_internal/block_batching/util.py", line 513',
             "    ray.wait("]
    filtered({"pid": 3, "lines": ["[raysegment] epoch 2/6", "Error in prefetcher thread.", *trace[:2]]})
    filtered({"pid": 4, "lines": ["another worker's line"]})
    filtered({"pid": 3, "lines": [trace[2], "OSError: Broken pipe", "after it"]})
    filtered({"pid": 3, "lines": ["Error in prefetcher thread.", *trace, "ValueError: a bad slice"]})
    assert printed == [["[raysegment] epoch 2/6"], ["another worker's line"], ["after it"],
                       ["Error in prefetcher thread.", *trace, "ValueError: a bad slice"]]


def test_a_cluster_that_wants_a_token_is_one_error_line_and_exit_1(capsys, monkeypatch):
    """``ray start`` turns token auth on once this machine has a token, and Ray sends it to no address
    it was given: ``RAY_ADDRESS=… python -m raysegment.train`` without RAY_AUTH_MODE=token ended in a
    traceback after 20 s of Ray's retries (2026-12-06). Now: one line saying what to set, exit 1.
    ``ray.init`` here fails as Ray's does then (its message, its cause); the address answers."""
    import socket

    import ray

    from raysegment.cli import run
    from raysegment.runtime import QUIET_ENV, ensure_ray

    for key in QUIET_ENV:  # ensure_ray sets them in this process; monkeypatch puts them back as they were
        monkeypatch.delenv(key, raising=False)

    def refuse(**kwargs):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token "
                               "is missing or incorrect. Note: RAY_AUTH_MODE is currently 'disabled' (not 'token').")
        except RuntimeError as cause:
            raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}") from cause

    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", refuse)
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        assert run(lambda argv: ensure_ray(address), []) == 1
        assert capsys.readouterr().err == (f"error: the Ray cluster at {address} wants its authentication token: set "
                                           "RAY_AUTH_MODE=token (the token from ~/.ray/auth_token, or RAY_AUTH_TOKEN / "
                                           "RAY_AUTH_TOKEN_PATH)\n")
        monkeypatch.setenv("RAY_AUTH_MODE", "token")  # then the token given is not the cluster's
        assert run(lambda argv: ensure_ray(address), []) == 1
        assert capsys.readouterr().err == (f"error: the Ray cluster at {address} refused this driver's authentication "
                                           "token: give it the cluster's (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                                           "~/.ray/auth_token, in that order)\n")
