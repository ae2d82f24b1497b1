"""Process plumbing: how a process joins Ray (a cluster given by address or RAY_ADDRESS, else a new
local one; telemetry off and Ray's per-pass console output off unless verbose, Ray's harmless lines
dropped by ``console``), scratch folders that a killed process cannot leak for good, heap trimming
for long-lived workers, secrets read from files. Base layer: imports nothing of raysegment but ``console`` (Ray only inside
functions)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from raysegment.console import quiet_driver_logs

START_ATTEMPTS = 2  # local Ray starts tried when Ray's own start timeout passes
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch (ray.train.v2 constants)

# Popen keywords for a child in a process group of its own (a terminal's Ctrl-C does not reach it,
# os.killpg stops it with its children) but in this session. Not a session of its own: on Linux a
# new session is a new scheduler autogroup, and beside a training run started from the same shell
# such a child got 3-15 % of a core instead of about 85 % (2026-12-04): servers timed out starting.
OWN_PROCESS_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def disable_telemetry() -> None:
    """Switch off Ray usage stats and MLflow telemetry for this process and its children, and Ray's
    abort on SIGTERM (below).

    Medical users expect no phoning home; every CLI entry point calls this before it starts
    Ray or MLflow. Values already set by the user win.
    """
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "RAY_TRAIN_V2_ENABLED": "1",
        # Ray's processes install abseil's failure-signal handler, which on SIGTERM (what Slurm,
        # Kubernetes, systemd, `timeout` send) printed six "*** SIGTERM received … PC: @ …" lines and
        # armed a 3-s alarm that aborted a driver still stopping its search: exit 134 (SIGABRT)
        # instead of 130 (ray-project/ray PR 64830). Python's handler stays: one line, exit 130.
        "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
    }.items():
        os.environ.setdefault(key, value)


def stop_signal(exc: BaseException) -> bool:
    """Whether ``exc`` is how a stop reaches a Ray driver: Ctrl-C (``KeyboardInterrupt``), or SIGTERM
    (a scheduler's stop, ``ray job stop``), which the handler ``ray.init`` installs raises as
    ``SystemExit(15)``, and a wait inside Ray as ``SystemExit(1)`` (as Ray Train's on Ctrl-C). A
    ``SystemExit`` with a message is a command's own ``error:`` and is not one."""
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and isinstance(exc.code, int))


def leave_ray() -> None:
    """Disconnect this driver from Ray (a Ray it started stops), as at its exit, so that no line a
    worker still streams prints after the command's last one: stopped by SIGTERM, the driver alone
    gets the signal and a training worker goes on until Ray ends it. Not importing Ray for it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


# Worker environment of a quiet run: no Ray Data bar per dataset pass (one epoch = one pass), no
# INFO line per execution plan, no deprecation warnings from Ray's own actors. ``--verbose``
# leaves them on. Values the user set win.
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "WARNING",
             "PYTHONWARNINGS": "ignore::DeprecationWarning",
             # Ray Train copies every print of a worker into its logger too: each line came twice.
             "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
             # a registry model's download drew a progress bar per load (per replica, per alias move)
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
             # MLflow's INFO lines (creating a store's tables, waiting for each registered version)
             "MLFLOW_LOGGING_LEVEL": "WARNING",
             # Tune's newer console engine prints its configuration box, results folder and a
             # TensorBoard hint even when silent; the older one prints nothing at verbose=0
             "RAY_AIR_NEW_OUTPUT": "0"}


class _TokenAuthNotice(logging.Filter):
    """Drops Ray's notice that a new local Ray has token authentication on, which tells how to switch it
    off; that it is off (``RAY_AUTH_MODE=disabled``) is still warned."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


TOKEN_AUTH_NOTICE = _TokenAuthNotice()


def quiet_environment(verbose: bool = False) -> dict:
    """``QUIET_ENV`` (empty when ``verbose``), also set in this process for what it starts."""
    if verbose:
        return {}
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in QUIET_ENV}


class ClusterUnreachable(RuntimeError):
    """The Ray cluster an address names does not answer: an environment fault (a later run may find it up)."""


def check_cluster(address: str | None) -> None:
    """``ClusterUnreachable`` when the Ray cluster at ``address`` (else RAY_ADDRESS) cannot be
    reached — ``[Errno 111] Connection refused``, a timeout, no such host; nothing for an address Ray
    resolves itself (``auto``, ``local``, none). ``ray.init`` retried such an address for minutes,
    printing a warning every 30 s."""
    import socket

    address = address or os.environ.get("RAY_ADDRESS")
    host, _, port = (address or "").split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()  # [::1]:6379 too
    except OSError as exc:
        raise ClusterUnreachable(f"the Ray cluster at {address} does not answer ({str(exc) or type(exc).__name__})") from None


def ensure_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Connect to ``address`` (or RAY_ADDRESS / a running cluster), else start a local Ray.

    Unless ``verbose``, the job's workers run with ``QUIET_ENV`` (no Ray Data bars or plan lines)."""
    import ray

    disable_telemetry()
    quiet = quiet_environment(verbose)
    if ray.is_initialized():
        return
    # Workers' own INFO records (a line per reported epoch, per started worker group) stay in the
    # session's log files; on the console: warnings, errors and what raysegment prints.
    logging_config = None if verbose else ray.LoggingConfig(log_level="WARNING")
    if not verbose:  # the GCS's errors first: the raylet's may come as ray.init returns (it wraps the rest)
        quiet_driver_logs()
    if address or os.environ.get("RAY_ADDRESS"):
        check_cluster(address)
        # A submitted job's own runtime env is merged with this one (Ray refuses a conflict: then
        # the job's settings are kept as they are).
        try:
            try:
                ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": quiet} if quiet else None,
                         logging_config=logging_config)
            except (ValueError, RuntimeError):
                ray.init(address=address, log_to_driver=True)
        except ConnectionError as exc:
            raise ClusterUnreachable(_refused(address or os.environ["RAY_ADDRESS"], exc)) from None
    else:
        if not verbose:
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(TOKEN_AUTH_NOTICE)
        _start_local(num_cpus, logging_config)
    quiet_ray_data(verbose)
    if not verbose:
        quiet_driver_logs()


def _refused(address: str, exc: BaseException) -> str:
    """Why the Ray cluster at ``address``, which answers, refused this driver (``ray.init``'s
    ``ConnectionError``, after some 20 s of retries): most often a token it wants. Ray sends this
    machine's token (~/.ray/auth_token) to an address found by itself, never to one given, so
    ``ray start`` (token auth on once a token exists) then ``RAY_ADDRESS=… python -m …`` failed."""
    why = f"{exc} {exc.__cause__}"
    if "InvalidAuthToken" not in why and "AuthenticationError" not in why:
        return f"the Ray cluster at {address} refused this driver ({str(exc.__cause__ or exc).splitlines()[0]})"
    if os.environ.get("RAY_AUTH_MODE") == "token":  # a token was sent: not the cluster's
        return (f"the Ray cluster at {address} refused this driver's authentication token: give it the cluster's "
                f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in that order)")
    return (f"the Ray cluster at {address} wants its authentication token: set RAY_AUTH_MODE=token "
            f"(the token from ~/.ray/auth_token, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)")


def quiet_ray_data(verbose: bool = False) -> None:
    """This process's Ray Data: no per-operator bars, no INFO line per execution plan (unless
    ``verbose``); our own lines are the progress report."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        quiet_progress_note()


def quiet_progress_note() -> None:
    """Ray Data's note that its progress bars are off (we switch them off), logged once by each
    process that runs a dataset: a driver, a Tune trial's actor, a training worker."""
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now. All are held open until each is known, so none
    comes back twice (separate ``free_port()`` calls can: the OS may reuse a port just closed)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def find_processes(match, holding: str | None = None) -> list[int]:
    """Pids of the machine's other processes whose (command line, environment) bytes ``match``
    (a predicate), or that hold a file open under the folder ``holding`` (Ray's agents rename
    themselves and drop its environment, but keep their logs in its temp dir open); ones that end
    or cannot be read meanwhile are skipped."""
    from pathlib import Path

    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if match((d / "cmdline").read_bytes(), (d / "environ").read_bytes()) or (
                    holding and any(os.readlink(fd).startswith(holding.rstrip("/") + "/") for fd in (d / "fd").iterdir())):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def stop_processes(match, grace_s: float = 4.0, holding: str | None = None) -> None:
    """SIGTERM the processes ``find_processes(match, holding)`` finds, SIGKILL those left after
    ``grace_s`` (one Ray's processes, found by its token or temp dir: ``ray stop`` would stop every
    Ray here)."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in find_processes(match, holding):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while find_processes(match, holding) and time.time() < deadline:
            time.sleep(0.2)


def _start_local(num_cpus: int | None, logging_config) -> None:
    """A new local Ray whose own processes know its address. With another Ray on the machine (a
    second job, a training run in the background), Ray Train's placement-group cleaner asks the
    state API for "the" cluster, cannot tell which, dies, and leaks each Tune trial's placement
    group: the next trial then waits for CPUs for ever. So the GCS gets a port chosen here, and the
    processes Ray spawns (they inherit this environment) get RAY_ADDRESS; this process's own
    environment is left as it was. Those processes also run Ray Train without its preemption
    watcher: one machine has no spot nodes to drain, and each run's watcher printed an ERROR line
    about its own restart policy (ray-project/ray#53727) and polled the GCS every 5 s."""
    import sys

    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", PREEMPTION_WATCHER)}
    os.environ.setdefault(PREEMPTION_WATCHER, "0")
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            os.environ.update({"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_GCS_SERVER_PORT": str(port)})
            try:
                # The dashboard (bound to 127.0.0.1) also serves the state API that Ray Train polls.
                ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True,
                         logging_config=logging_config)
                return
            except Exception as exc:
                # Ray waits a fixed 30 s for its raylet; on a machine busy with training that can pass.
                if attempt == START_ATTEMPTS or "timed out during startup" not in str(exc):
                    raise
                print(f"[raysegment] the local Ray did not start within Ray's 30 s (a busy machine?); "
                      f"starting it again ({attempt + 1} of {START_ATTEMPTS})", file=sys.stderr, flush=True)
                ray.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def scratch_dir(prefix: str, root: str | Path | None = None):
    """A temporary folder ``ROOT/PREFIX<pid>-…`` (ROOT: the system's temp folder), removed when the
    ``with`` ends. One that a killed process left (a checkpoint a training worker was staging, the
    upload of a replica killed mid-request) is removed by ``clear_stale_scratch`` in a later process."""
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-", dir=root) as tmp:
        yield Path(tmp)


def stale_scratch(prefix: str, root: str | Path | None = None) -> list[Path]:
    """The ``scratch_dir(prefix)`` folders (and others named ``PREFIX<pid>``, as ``prepare``'s) whose
    process no longer exists. A folder of a live process (of any user) is not stale, nor one whose
    PID a new process has taken meanwhile (it goes at a later clear). Assumes one PID namespace per
    temp folder, as a Ray node has (its own session files in /tmp/ray rely on the same)."""
    stale = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.append(path)
    return stale


def clear_stale_scratch(prefix: str, root: str | Path | None = None) -> int:
    """Remove ``stale_scratch(prefix, root)`` → how many."""
    stale = stale_scratch(prefix, root)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def read_secret(path: str | Path) -> str:
    """The stripped text of a secret's file (a bearer token, a PACS's credentials; a file or a mounted
    Secret, not a command line, which ``ps`` shows) → ValueError when it cannot be read or is empty
    (an empty token would fail every request, not the start)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def pid_alive(pid: int) -> bool:
    """A process with this id exists on this host (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


TRIM_EVERY = 16  # studies between two heap trims of a long-lived worker


class HeapTrimmer:
    """Counts a long-lived worker's studies and trims its heap every ``TRIM_EVERY`` of them, so its
    RSS stays bounded over hundreds of studies of many sizes (the soak)."""

    def __init__(self, every: int = TRIM_EVERY):
        self.every, self.studies = every, 0

    def study_done(self) -> None:
        self.studies += 1
        if self.studies % self.every == 0:
            trim_heap()


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere).
    A worker segmenting studies of many sizes grew from 868 to 1437 MB over 200 studies and kept it;
    trimmed every 20 studies it stayed between 786 and 1255 MB, 6 % slower (after every study: flat,
    but 25 % slower, the pages faulted in again; MobileNetV2, 1 thread, 2026-12-02)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None
