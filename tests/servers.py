"""Real servers for the slow tier: a token-auth Ray head (`ray start`), an MLflow server and an
S3-compatible object store (moto), all on 127.0.0.1, started and stopped by the tests themselves.
Used by the ``cluster`` fixture (conftest) and the two-node test."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from raysegment.runtime import OWN_PROCESS_GROUP, free_port, free_ports, stop_processes  # noqa: F401  (the tests' imports too)

VENV_BIN = str(Path(sys.executable).parent)
REPO = Path(__file__).resolve().parents[1]
BUCKET = "raysegment-test"


def wait_http(url: str, timeout: float = 120, answers=()) -> None:
    """Until ``url`` answers 2xx, or one of the HTTP statuses ``answers`` (401 of a server that wants
    credentials)."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError as exc:
            if exc.code in answers:
                return
            time.sleep(0.5)
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(url)


def ray_env(root: Path) -> dict:
    """Environment for `ray` CLI calls: token auth (a fresh token file in ``root``), telemetry off."""
    token = root / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PATH": VENV_BIN + os.pathsep + os.environ["PATH"]}
    env.pop("RAY_ADDRESS", None)
    return env


def stop_ray(env: dict, ray_tmp: str, grace: float = 4.0) -> None:
    """Stop the Ray cluster a test started, and only that one (``ray stop --force`` would also kill
    any other Ray on the machine, a developer's training run included): its processes carry the
    test's token path in their environment or its temp dir on their command line, or (its agents,
    which rename themselves and drop that environment) hold their logs in that temp dir open."""
    token, tmp = env["RAY_AUTH_TOKEN_PATH"].encode(), ray_tmp.encode()
    stop_processes(lambda cmdline, environ: tmp in cmdline or token in environ, grace, holding=ray_tmp)


def s3_fs(env: dict):
    """pyarrow's S3 client on the test's object store."""
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                                   secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_DEFAULT_REGION"],
                                   allow_bucket_creation=True)


def submit(cluster, *args: str, timeout: float = 900) -> str:
    """`ray job submit -- python -m ...` (waits for the job); returns its log, fails the test on error."""
    # RAY_ADDRESS for every process of the job: Ray Train's placement-group cleaner asks the state
    # API for "the" cluster, and with another Ray on the machine (a developer's run) it cannot tell
    # which one, dies, and leaks the trial's placement group (the next trial then waits for ever).
    env_json = json.dumps({"env_vars": {"RAY_ADDRESS": cluster["gcs"]}})
    cmd = [f"{VENV_BIN}/ray", "job", "submit", "--address", cluster["address"], "--runtime-env-json", env_json, "--",
           f"{VENV_BIN}/python", "-m", *args]
    deadline = time.time() + 120
    while True:
        r = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=timeout, cwd=cluster["root"])
        # The dashboard answers HTTP before its job agent is up (seconds on a loaded machine): the
        # job was not submitted, so submitting again is safe.
        if "No available agent to submit job" not in r.stdout + r.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout




def agent_port_args(ports: list[int]) -> list[str]:
    """``ray start`` options giving a raylet's four agents these four ports."""
    names = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port")
    return [arg for name, port in zip(names, ports, strict=True) for arg in (name, str(port))]


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[dict]:
    """A token-auth Ray head, an MLflow server (sqlite + local artifacts) and an S3-compatible
    object store (moto) holding the runs, all on 127.0.0.1."""
    env = ray_env(root)
    gcs, dash, mlflow_port, s3_port, *agents = free_ports(8)  # distinct: two equal ports fail `ray start`
    # Credentials and endpoint reach every Ray process (and pyarrow's S3 client) as on a cluster.
    env.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    s3_log = open(root / "s3.log", "w")
    s3_proc = subprocess.Popen([f"{VENV_BIN}/moto_server", "-H", "127.0.0.1", "-p", str(s3_port)], env=env,
                               stdout=s3_log, stderr=subprocess.STDOUT, **OWN_PROCESS_GROUP)
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    mlflow_log = open(root / "mlflow.log", "w")
    mlflow_proc = subprocess.Popen(
        [f"{VENV_BIN}/mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        # Without MLflow 3's job runner (a supervisor and 7 huey consumers, for GenAI jobs raysegment
        # never submits): 8 fewer processes to start and stop, about half the server's memory.
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=mlflow_log, stderr=subprocess.STDOUT,
        **OWN_PROCESS_GROUP)
    subprocess.run([f"{VENV_BIN}/ray", "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash),
                    "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "true",
                    "--disable-usage-stats", "--temp-dir", ray_tmp,
                    # Ports of its own: another Ray on the machine (a developer's run) holds the defaults,
                    # and a job agent that cannot bind leaves "No available agent to submit job".
                    *agent_port_args(agents)],
                   env=env, check=True, capture_output=True, cwd=root)
    uri = f"http://127.0.0.1:{mlflow_port}"
    try:
        wait_http(f"{uri}/health", timeout=300)  # MLflow imports for a minute or more on a loaded machine
        wait_http(f"http://127.0.0.1:{dash}")
        wait_http(env["AWS_ENDPOINT_URL"])
        s3_fs(env).create_dir(BUCKET)
        yield {"env": env, "root": root, "mlflow": uri, "address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}",
               "s3": f"s3://{BUCKET}/runs"}
    finally:
        stop_ray(env, ray_tmp)
        for proc in (mlflow_proc, s3_proc):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        mlflow_log.close()
        s3_log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


ORTHANC_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_available() -> bool:
    return shutil.which("Orthanc") is not None and Path(ORTHANC_PLUGIN).is_file()


@contextlib.contextmanager
def running_orthanc(root: Path, extra: dict | None = None, port: int | None = None) -> Iterator[str]:
    """A real PACS: Orthanc (Debian packages ``orthanc``, ``orthanc-dicomweb``) on 127.0.0.1 with a
    temporary config and storage, HTTP only (no DICOM port, no remote access); yields its DICOMweb URL.
    ``extra``: more configuration (e.g. ``LuaScripts``, ``StableAge``)."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = {"Name": "raysegment-test", "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "StorageDirectory": str(root / "storage"),
              "IndexDirectory": str(root / "index"), "Plugins": [ORTHANC_PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **(extra or {})}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            **OWN_PROCESS_GROUP)
    try:
        wait_http(f"http://127.0.0.1:{port}/system", timeout=60, answers=(401,))
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@contextlib.contextmanager
def running_service(root: Path, *args: str, port: int | None = None, timeout: float = 240) -> Iterator[str]:
    """``python -m raysegment.serve ARGS --port PORT`` as the operator runs it (its own local Ray),
    stopped with SIGTERM and its Ray's leftovers after; yields its base URL once /v1/health answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = ray_env(root)
    ray_tmp = tempfile.mkdtemp(prefix="rs-serve-", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "raysegment.serve", *args, "--port", str(port)], env=env, cwd=root,
                            stdout=log, stderr=subprocess.STDOUT, **OWN_PROCESS_GROUP)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while "[raysegment] serving" not in (root / "serve.log").read_text():  # its line once Serve says ready
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the service did not start: {(root / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        wait_http(f"{url}/v1/health", timeout=30)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        stop_ray(env, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@contextlib.contextmanager
def hospital_pacs(dicomweb_url: str, deletes: bool = False, page: int | None = None,
                  as_stored: bool = True) -> Iterator[str]:
    """A DICOMweb root in front of ``dicomweb_url`` (a ``running_orthanc``) that answers as many hospital
    PACS do: QIDO-RS, WADO-RS and STOW-RS pass through; without ``deletes``, DICOMweb DELETE (not in the
    standard) is 405 and there is no Orthanc REST API beside it (404); with ``page``, a QIDO-RS answer
    holds at most that many records from its ``offset`` (PS3.18: the rest asked for with ``offset``),
    with the standard's Warning header when more remain; without ``as_stored``, a retrieval that asks for
    the instances as stored (``transfer-syntax=*``) is 406 Not Acceptable. Yields its DICOMweb URL."""
    import http.server
    import threading
    from urllib.parse import parse_qsl, urlencode, urlsplit

    import requests

    upstream = dicomweb_url.rstrip("/")
    root = upstream[: -len("/dicom-web")]

    class Handler(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            if (self.command == "DELETE" and not deletes) or not self.path.startswith("/dicom-web"):
                self._send(405 if self.command == "DELETE" else 404, b"", {})
                return
            if not as_stored and "transfer-syntax=*" in self.headers.get("Accept", "").replace(" ", ""):
                self._send(406, b"", {})
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
            split = urlsplit(self.path)
            query = dict(parse_qsl(split.query))
            qido = page and self.command == "GET" and split.path.endswith(("/series", "/instances", "/studies"))
            offset = int(query.pop("offset", 0)) if qido else 0
            if qido:
                query.pop("limit", None)
            path = split.path + ("?" + urlencode(query) if query else "") if qido else self.path
            r = requests.request(self.command, root + path, data=body, headers=headers, timeout=60)
            content, extra = r.content, {}
            if qido and r.ok:
                records = r.json()
                content = json.dumps(records[offset: offset + page]).encode()
                if offset + page < len(records):
                    extra["Warning"] = '299 raysegment-test: "There are additional results that can be requested"'
            self._send(r.status_code, content, {"Content-Type": r.headers.get("Content-Type", ""), **extra})

        def _send(self, status: int, content: bytes, headers: dict) -> None:
            self.send_response(status)
            for k, v in headers.items():
                if v:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_DELETE = _forward

        def log_message(self, *args) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()
