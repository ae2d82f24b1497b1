"""The service under load (``python -m raysegment.bench serve``): a bounded load test against
127.0.0.1 that stops by itself — latency percentiles and throughput at 1 client and at C clients,
for 1 and 2 replicas, optionally with a replica SIGKILLed every K seconds — next to the in-process
time of the same volume and the batch job's studies/s on the same machine.

Imports ``service.run``, ``inference`` and ``config``; not ``training``, ``soak`` or ``cli``.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from raysegment.config import InferConfig, ServeConfig


def load_test(url: str, body: bytes, clients: int, requests_n: int, timeout_s: float = 120.0,
              token: str | None = None, kill_every_s: float | None = None, kill=None,
              expected: bytes | None = None) -> dict:
    """``requests_n`` POSTs of ``body`` to ``url/v1/segment`` from ``clients`` threads → counts,
    p50/p95/p99 latency (s) of the answered ones, throughput (answered/s). With ``kill_every_s``,
    ``kill()`` (default: SIGKILL a random replica of this Ray) runs that often during the test. With
    ``expected``, every 200 answer is compared with it (``wrong_masks``)."""
    import requests

    headers = {"Content-Type": "application/octet-stream", **({"Authorization": f"Bearer {token}"} if token else {})}
    todo = iter(range(requests_n))
    lock, results = threading.Lock(), []

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    r = session.post(f"{url}/v1/segment", data=body, headers=headers, timeout=timeout_s)
                    status, wrong = r.status_code, expected is not None and r.status_code == 200 and r.content != expected
                except requests.RequestException as exc:
                    status, wrong = type(exc).__name__, False
                with lock:
                    results.append((status, time.perf_counter() - t0, wrong))

    stop, kills = threading.Event(), []
    started = lambda: len(results) >= max(1, requests_n // 4)  # noqa: E731  (first kill once the load is on)
    killer = threading.Thread(target=_killer, args=(kill_every_s, kill or _kill_replica, stop, kills, started), daemon=True)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads + ([killer] if kill_every_s else []):
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    ok = [s for status, s, _ in results if status == 200]
    pct = (lambda q: round(float(np.percentile(ok, q)), 3)) if ok else (lambda q: None)
    return {"clients": clients, "requests": requests_n, "answered": len(results), "ok": len(ok),
            "failed": len(results) - len(ok), "timeouts": sum(s in ("ReadTimeout", "ConnectTimeout") for s, _, _ in results),
            "wrong_masks": sum(w for _, _, w in results), "slowest_s": round(max(s for _, s, _ in results), 3),
            "p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99),
            "throughput_per_s": round(len(ok) / wall, 3), "wall_s": round(wall, 1), "kills": len(kills)}


def _killer(every_s: float, kill, stop: threading.Event, kills: list, started) -> None:
    """The first kill as soon as ``started()`` (a quarter of the requests answered: on a fast machine a
    short test may end before ``every_s``), then one every ``every_s``."""
    while not started():
        if stop.wait(0.05):
            return
    while True:
        if kill():
            kills.append(time.time())
        if stop.wait(every_s):
            return


def _kill_replica() -> bool:
    """SIGKILL a random live replica of the service on this Ray → whether one was killed."""
    from raysegment.service.run import replica_pids

    pids = replica_pids()
    if not pids:
        return False
    os.kill(pids[np.random.default_rng().integers(len(pids))], signal.SIGKILL)
    return True


def in_process_seconds(predictor, study: Path, repeats: int) -> float:
    """Median seconds of the batch job's per-study code (read, predict, write the mask) on ``study``."""
    from raysegment.inference.study import segment_study

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats + 1):  # the first is warm-up
            t0 = time.perf_counter()
            segment_study(study, predictor, "bench", Path(tmp))
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def batch_studies_per_s(model: str, study: Path, copies: int, actors: int, predict) -> dict:
    """The batch job (``actors`` one-thread actors, Ray already up) over ``copies`` of ``study``:
    studies/s end to end (driver start, actor start and report included) and in its steady state
    (the actors' own seconds per study, side by side: the stricter figure to compare a service with)."""
    import json
    import shutil

    from raysegment.inference.batch import run_batch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i in range(copies):
            shutil.copy(study, folder / f"copy{i:03d}.nii.gz")
        config = InferConfig(models=(model,), input=str(folder), output=str(Path(tmp) / "out"), predict=predict,
                             actors=actors, threads=1, progress=False, diagnosis=None, report_figures=0)
        t0 = time.perf_counter()
        run_batch(config)
        wall = time.perf_counter() - t0
        busy = sum(json.loads(line)["seconds"] for line in (Path(tmp) / "out" / "ledger.jsonl").read_text().splitlines())
    return {"end_to_end": round(copies / wall, 3), "steady": round(copies / (busy / actors), 3)}


def bench_serve(config: ServeConfig, study: Path, clients: int, requests_n: int, replicas: tuple[int, ...] = (1, 2),
                kill_every_s: float | None = None) -> dict:
    """The whole benchmark: in-process time, then per replica count the service at 1 and ``clients``
    clients (and under replica kills), and the batch job with as many actors."""
    import torch

    from raysegment.inference.predictor import Predictor
    from raysegment.service import run

    torch.set_num_threads(config.threads or 1)
    predictor = Predictor.load(config.model, config.predict, config.tracking_uri)
    body = study.read_bytes()
    out = {"model": config.model, "runtime": config.predict.runtime, "in_plane": config.predict.in_plane,
           "threads_per_replica": config.threads or 1,
           "study": study.name, "in_process_s": round(in_process_seconds(predictor, study, 5), 3), "runs": []}
    for n in replicas:
        url = run.start(replace(config, replicas=n))
        load_test(url, body, n, 2 * n)  # warm-up: every replica has served
        row = {"replicas": n, "one_client": load_test(url, body, 1, max(5, requests_n // 4)),
               "saturated": load_test(url, body, clients, requests_n)}
        if kill_every_s and n >= 2:  # one replica killed every few seconds serves nothing: not a test of anything
            row["with_kills"] = load_test(url, body, clients, requests_n, kill_every_s=kill_every_s, timeout_s=60)
        run.stop()  # the batch job gets the CPUs the replicas held
        row["batch_studies_per_s"] = batch_studies_per_s(config.model, study, requests_n, n, config.predict)
        out["runs"].append(row)
    return out


def _batch(row: dict) -> str:
    b = row["batch_studies_per_s"]
    return f"{b['end_to_end']} / {b['steady']}"


def markdown(result: dict) -> str:
    """The benchmark as a table (docs/benchmarks.md)."""
    lines = [f"model {result['model']} ({result['runtime']}, in-plane {result.get('in_plane', 'as-stored')}, "
             f"{result['threads_per_replica']} thread per replica), "
             f"in-process {result['in_process_s']:.3f} s per study", "",
             "| replicas | clients | p50 s | p95 s | p99 s | studies/s | failed | kills | batch job studies/s (end to end / steady) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["runs"]:
        for key in ("one_client", "saturated", "with_kills"):
            if key in row:
                r = row[key]
                lines.append(f"| {row['replicas']} | {r['clients']} | {r['p50_s']} | {r['p95_s']} | {r['p99_s']} | "
                             f"{r['throughput_per_s']} | {r['failed']} | {r['kills']} | "
                             f"{_batch(row) if key == 'saturated' else ''} |")
    return "\n".join(lines)
