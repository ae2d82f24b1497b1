"""Running the soak: one Ray head for the whole afternoon, the scheduled batch job run again and again
(``python -m raysegment.infer`` as cron runs it) while studies arrive in waves, a chaos loop SIGKILLs
a random inference actor every K settled studies and the driver itself a few times, until a run
finds nothing new; then one undisturbed run over the same tree, the reference for masks, speed and
memory. Process RSS is sampled from ``/proc`` (Linux).

Imports ``service``, ``inference`` and ``runtime``; not ``cli``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raysegment.inference.batch import LAST_RUN
from raysegment.runtime import OWN_PROCESS_GROUP, find_processes, free_port


@dataclass(frozen=True)
class SoakConfig:
    """One soak (``python -m raysegment.bench soak``)."""

    source: str  # an ACDC source (official NIfTI layout or SSL4MIS HDF5 with info.csv)
    out: str  # everything goes here: stage/, input/, chaos/, reference/, soak.json
    model: str = "shipped:mobilenet_v2"
    studies: int = 500
    bad: float = 0.1  # share of bad inputs
    kill_every: int = 25  # settled studies between two actor kills
    driver_kills: int = 3  # runs whose driver is SIGKILLed part-way
    waves: int = 4  # arrivals of new studies (one before each of the first runs)
    actors: int = 2
    seed: int = 0
    extra_args: tuple[str, ...] = field(default_factory=tuple)  # more raysegment.infer options
    serve_requests: int = 60  # then the online service: this many requests (0: none) ...
    serve_kill_every_s: float = 5.0  # ... while a replica is SIGKILLed this often


@dataclass
class RunRecord:
    """One batch run: exit code, its summary line, kills, wall time (s), RSS samples (MB)."""

    returncode: int | None = None
    summary: dict | None = None
    actor_kills: int = 0
    driver_killed: bool = False
    wall_s: float = 0.0
    samples: list = field(default_factory=list)  # (settled studies so far, driver MB, {actor pid: MB})


# --------------------------------------------------------------------------- a Ray head of our own


@contextmanager
def ray_head(root: Path, cpus: int):
    """``ray start --head`` with a token of its own and telemetry off → the environment runs use
    (``RAY_ADDRESS`` set); stopped after, and only this head (other Rays on the machine live on)."""
    import secrets

    root.mkdir(parents=True, exist_ok=True)
    token = root / "ray_token"
    token.write_text(secrets.token_hex(32))
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="rs-soak-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env.pop("RAY_ADDRESS", None)
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={cpus}",
                    "--include-dashboard=false", f"--temp-dir={tmp}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True)
    try:
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        for pid in _our_pids(str(token)):
            _kill(pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _our_pids(marker: str, name: str = "") -> list[int]:
    """Processes whose environment carries ``marker`` (our head's token path), and ``name`` in their
    command line (Ray workers show their actor class there)."""
    marker_b, name_b = marker.encode(), name.encode()
    return find_processes(lambda cmdline, environ: marker_b in environ and name_b in cmdline)


def _kill(pid: int, sig=signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


# --------------------------------------------------------------------------- one batch run under chaos


def run_batch_job(config: SoakConfig, input_dir: Path, output: Path, env: dict, kill_every: int | None,
                  kill_driver_after: int | None, rng: np.random.Generator) -> RunRecord:
    """``python -m raysegment.infer`` over ``input_dir`` while watching its ledger: an actor SIGKILLed
    every ``kill_every`` newly settled studies, the driver after ``kill_driver_after`` of them."""
    cmd = [sys.executable, "-m", "raysegment.infer", "--model", config.model, "--input", str(input_dir),
           "--output", str(output), "--diagnosis", "none", "--actors", str(config.actors), "--threads", "1",
           "--report-figures", "0", *config.extra_args]
    ledger, last_run = output / "ledger.jsonl", output / LAST_RUN
    last_run.unlink(missing_ok=True)  # the previous run's: this run writes its own only if it gets to its end
    before = _lines(ledger)
    record, marker = RunRecord(), env["RAY_AUTH_TOKEN_PATH"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # counts: last_run.json
                            **OWN_PROCESS_GROUP)
    last_kill, last_sample = 0, 0.0
    while proc.poll() is None:
        time.sleep(0.2)
        settled = _lines(ledger) - before
        actors = _our_pids(marker, "SegmentActor")
        if time.perf_counter() - last_sample >= 1.0:
            record.samples.append((settled, rss_mb(proc.pid), {p: rss_mb(p) for p in actors}))
            last_sample = time.perf_counter()
        if kill_every and actors and settled - last_kill >= kill_every:
            record.actor_kills += _kill(actors[int(rng.integers(len(actors)))])
            last_kill = settled
        if kill_driver_after is not None and settled >= kill_driver_after:
            _kill(proc.pid)
            record.driver_killed = True
    record.returncode, record.wall_s = proc.returncode, time.perf_counter() - t0
    record.summary = json.loads(last_run.read_text()) if last_run.exists() else None
    return record


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# --------------------------------------------------------------------------- the service under kills


def serve_under_kills(config: SoakConfig, env: dict, study: Path, expected: bytes, root: Path) -> dict:
    """``python -m raysegment.serve`` (2 replicas) on the soak's head, a bounded load test of
    ``serve_requests`` POSTs of ``study`` while a replica is SIGKILLed every ``serve_kill_every_s``:
    answered, failed, timed out (hung), wrong masks (against ``expected``)."""
    from raysegment.service.load import load_test

    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "raysegment.serve", "--model", config.model, "--port", str(port),
                             "--replicas", "2", "--threads", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            **OWN_PROCESS_GROUP)
    marker = env["RAY_AUTH_TOKEN_PATH"]
    try:
        deadline = time.time() + 300
        while "[raysegment] serving" not in (root / "serve.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the service did not start: {(root / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
        rng = np.random.default_rng(config.seed)

        def kill() -> bool:
            pids = _our_pids(marker, "ServeReplica")
            return bool(pids) and _kill(pids[int(rng.integers(len(pids)))])

        return load_test(f"http://127.0.0.1:{port}", study.read_bytes(), 4, config.serve_requests, timeout_s=60,
                         kill_every_s=config.serve_kill_every_s, kill=kill, expected=expected)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
