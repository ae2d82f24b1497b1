"""``python -m raysegment.serve``: the online segmentation service on Ray Serve, in the foreground
until Ctrl-C / SIGTERM. A thin layer over ``raysegment.service``.

    python -m raysegment.serve --model models:/raysegment-densenet121@champion --mlflow-uri http://127.0.0.1:5000
    curl -s --data-binary @patient001_4d.nii.gz -H 'Content-Type: application/octet-stream' \\
        http://127.0.0.1:8000/v1/segment -o patient001_4d_seg.nii.gz

Top layer (no stage imports it): imports ``cli.args``, ``cli.lost``, ``service``, ``analysis``,
``io``, ``config`` and ``runtime``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from raysegment.cli import add_in_plane_argument, command_parser
from raysegment.cli.lost import cluster_gone, watch_cluster
from raysegment.config import PredictConfig, ServeConfig, default_of


def build_parser() -> argparse.ArgumentParser:
    d = lambda name: default_of(ServeConfig, name)  # noqa: E731
    p = command_parser(
        "serve",
        "The online segmentation service on Ray Serve, in the foreground until Ctrl-C: POST a NIfTI file to "
        "/v1/segment and get its mask (or ?format=json for volumes, EF and diagnosis); a registry alias is followed as it "
        "moves. With --pacs and --output, series pushed by the PACS get their DICOM SEGs stored back.",
        "python -m raysegment.serve --model models:/raysegment-densenet121@champion --mlflow-uri http://mlflow:5000",
        "curl --data-binary @study.nii.gz -H 'Content-Type: application/octet-stream' "
        "http://127.0.0.1:8000/v1/segment -o seg.nii.gz")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS (followed when the alias moves), models:/NAME/VERSION, "
                                                  "shipped:BACKBONE, a .safetensors/.onnx file or a checkpoint folder")
    p.add_argument("--mlflow-uri", default=d("tracking_uri"), help="tracking server of the registry")
    p.add_argument("--host", default=d("host"), help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=d("port"), help="HTTP port")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=d("replicas"), help="model replicas (Ray Serve)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscaled replicas, e.g. 1:4")
    p.add_argument("--cpus-per-replica", type=float, default=d("cpus_per_replica"), help="CPUs Ray reserves per replica")
    p.add_argument("--gpu", action="store_true", help="one GPU per replica (predicts on CUDA)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx"], help="onnx: ONNX Runtime on the CPU (fp32)")
    add_in_plane_argument(p)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, default=d("threads"), help="torch threads per replica (default: its CPUs)")
    p.add_argument("--poll-s", type=float, default=d("poll_s"), help="seconds between checks of the registry alias")
    p.add_argument("--token-file", help="file holding a bearer token every request must carry")
    p.add_argument("--max-body-mb", type=float, default=d("max_body_mb"), help="larger request bodies get 413, MB")
    p.add_argument("--pacs", help="DICOMweb URL (http://HOST:PORT/dicom-web) the PACS push retrieves from and stores SEGs to")
    p.add_argument("--pacs-auth", metavar="FILE",
                   help="with --pacs: file holding the PACS's credentials, USER:PASSWORD (HTTP basic) or 'Bearer TOKEN'")
    p.add_argument("--output", help="with --pacs: masks, SEGs and ledger.jsonl, the scheduled job's --output")
    p.add_argument("--no-store", action="store_true", help="with --pacs: keep the SEGs under OUTPUT, do not STOW-RS them")
    p.add_argument("--no-sr", action="store_true",
                   help="with --pacs: store no indices SR with the SEGs (for a PACS that takes no Comprehensive 3D SR)")
    p.add_argument("--stack-settle", type=float, default=d("stack_settle_s"), metavar="S",
                   help="with --pacs: a short-axis stack stored as a series per slice is segmented once no slice of its "
                        "study was pushed for S seconds (longer than the scanner's gap between slices; 0: at each push)")
    p.add_argument("--diagnosis", default=d("diagnosis"),
                   help="?format=json's ACDC diagnosis of a cine: 'shipped', a JSON file from `python -m raysegment.diagnosis "
                        "fit`, models:/raysegment-diagnosis@champion, or 'none'")
    p.add_argument("--verbose", action="store_true", help="Ray Serve's own INFO output")
    return p


def config_from_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of a parsed command line; ``p.error`` (exit 2) on the first bad value."""
    autoscale = None
    if a.autoscale:
        try:
            lo, hi = (int(v) for v in a.autoscale.split(":"))
        except ValueError:
            p.error(f"--autoscale must be MIN:MAX, e.g. 1:4, not {a.autoscale!r}")
        if not 0 <= lo <= hi or hi < 1:
            p.error(f"--autoscale {a.autoscale}: need 0 ≤ MIN ≤ MAX and MAX ≥ 1")
        autoscale = (lo, hi)
    if a.replicas < 1 or not 0 < a.port < 65536 or a.cpus_per_replica <= 0 or a.poll_s <= 0:
        p.error("--replicas, --cpus-per-replica and --poll-s must be > 0, --port within 1–65535")
    if not 0 <= a.stack_settle < 3600:
        p.error(f"--stack-settle is seconds within 0–3600, not {a.stack_settle:g}")
    if bool(a.pacs) != bool(a.output):
        p.error("--pacs and --output go together (the ledger the scheduled job shares)")
    if a.runtime == "onnx" and a.gpu:
        p.error("--runtime onnx runs on the CPU (ONNX Runtime's CPU provider); drop --gpu")
    from raysegment.cli.args import diagnosis_ref, pacs_auth, read_secret

    token = read_secret(p, "--token-file", a.token_file)
    if a.pacs_auth and not a.pacs:
        p.error("--pacs-auth gives the credentials of --pacs; there is no --pacs")
    predict = PredictConfig(device="cuda" if a.gpu else "cpu", precision=a.precision, runtime=a.runtime, in_plane=a.in_plane)
    return ServeConfig(model=a.model, tracking_uri=a.mlflow_uri, predict=predict, host=a.host, port=a.port,
                       replicas=a.replicas, autoscale=autoscale, cpus_per_replica=a.cpus_per_replica,
                       gpus_per_replica=1.0 if a.gpu else 0.0, threads=a.threads, poll_s=a.poll_s, token=token,
                       max_body_mb=a.max_body_mb, pacs=a.pacs, output=str(Path(a.output).resolve()) if a.output else None,
                       store=not a.no_store, sr=not a.no_sr, stack_settle_s=a.stack_settle, diagnosis=diagnosis_ref(a.diagnosis),
                       pacs_auth=pacs_auth(p, a.pacs_auth))


def _port_free(host: str, port: int) -> bool:
    """Whether this machine can bind ``host:port`` now (a local Ray's proxy binds it here; taken, it
    failed with some 70 lines of Ray's tracebacks)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    from raysegment.cli.args import check_models, check_numbers, check_registry

    p = build_parser()
    a = p.parse_args(argv)
    check_numbers(p, a)
    config = config_from_args(p, a)
    from raysegment.runtime import quiet_environment
    from raysegment.service import run

    quiet_environment(a.verbose)  # before MLflow loads: no INFO lines of a registry lookup
    check_registry(a)
    check_models(p, [a.model], a.mlflow_uri)
    if config.diagnosis:  # a replica's traceback otherwise
        from raysegment.analysis.diagnosis import load

        try:
            load(config.diagnosis, config.tracking_uri)
        except Exception as exc:
            p.error(f"--diagnosis {config.diagnosis}: cannot load ({type(exc).__name__}: {exc})")
    if not os.environ.get("RAY_ADDRESS") and not _port_free(config.host, config.port):
        p.error(f"--port {config.port}: {config.host}:{config.port} is in use (another service?); give another --port")
    if config.pacs:  # a wrong --pacs would otherwise only show in the log of every pushed series
        from raysegment.io.dicomweb import PacsRefused, PacsUnreachable, check_pacs

        try:
            check_pacs(config.pacs, config.pacs_auth)
        except PacsUnreachable as exc:
            print(f"error: --pacs: {exc}; nothing was started, the same command tries again", file=sys.stderr)
            return 1
        except PacsRefused as exc:
            p.error(f"--pacs: {exc}")
        except ValueError as exc:
            p.error(f"--pacs {exc}")

    try:
        url = run.start(config, verbose=a.verbose)
    except Exception as exc:
        print(f"error: the service did not start ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    stopping = []  # after Ray's start, which installs handlers of its own; SIGINT too (ignored in `cmd &`)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(1))
    print(f"[raysegment] serving {config.model} at {url}/v1/segment (health: {url}/v1/health); Ctrl-C stops",
          flush=True)
    with watch_cluster(lambda lost, why: _lost_line(url, lost, why)):
        while not stopping:
            time.sleep(0.5)
    print("[raysegment] stopping the service", flush=True)
    run.stop()
    return 0


def _lost_line(url: str, lost, why: str) -> str:
    """The line of a service whose Ray went away (``cli.lost``): it answered nothing from then on,
    and Ray ended it a minute later with a C++ log line."""
    what, when = cluster_gone(lost, why)
    return f"error: {what}; the service at {url} is down: {when}the same command serves again"


if __name__ == "__main__":
    from raysegment.cli.serve import main as _main

    sys.exit(_main())
