"""``bench serve``, ``bench onnx`` and ``bench soak``: the command lines of the service, runtime and
soak benchmarks (``raysegment.service.load``, ``inference.evaluation``, ``raysegment.soak``).

Top layer (no stage imports it): imports ``cli.gpu_smoke``, ``soak``, ``service``, ``inference``,
``data`` and ``config``.
"""

from __future__ import annotations

import json
from pathlib import Path

from raysegment.cli import add_in_plane_argument
from raysegment.config import PredictConfig, default_of

SERVICE_BENCHES = ("serve", "onnx", "soak")


def add_service_benches(sub) -> None:
    """Their subcommands on ``python -m raysegment.bench``'s parser."""
    s = sub.add_parser("serve", help="the online service under load: p50/p95/p99 and studies/s at 1 and C clients, "
                                     "1 and 2 replicas, against in-process and the batch job")
    s.add_argument("--model", default="shipped:mobilenet_v2", help="any reference raysegment.serve --model takes")
    s.add_argument("--study", default=None, help="a NIfTI study (default: the bundled sample's first volume, written as NIfTI)")
    s.add_argument("--clients", type=int, default=4)
    s.add_argument("--requests", type=int, default=24, help="requests per load test (it stops by itself)")
    s.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    s.add_argument("--kill-every", type=float, default=None, metavar="SECONDS",
                   help="also a load test during which a random replica is SIGKILLed every SECONDS")
    s.add_argument("--runtime", default="torch", choices=["torch", "onnx"])
    s.add_argument("--precision", default=default_of(PredictConfig, "precision"), choices=["auto", "bf16", "fp16", "fp32"])
    s.add_argument("--threads", type=int, default=1, help="torch threads per replica, per batch actor and in-process")
    s.add_argument("--port", type=int, default=8765)
    add_in_plane_argument(s)
    o = sub.add_parser("onnx", help="ONNX Runtime against torch fp32: voxels equal, CPU s per volume (threads matched)")
    o.add_argument("--data", required=True, help="shards; their --split volumes are predicted")
    o.add_argument("--model", default="shipped:mobilenet_v2")
    o.add_argument("--split", default="val")
    o.add_argument("--threads", type=int, default=1)
    k = sub.add_parser("soak", help="500 studies, one in ten bad, actors and drivers SIGKILLed: nothing lost, nothing twice")
    k.add_argument("--source", required=True, help="ACDC data (official NIfTI layout, or SSL4MIS HDF5 with info.csv)")
    k.add_argument("--out", required=True, help="an empty folder for the corpus, the runs and soak.json")
    k.add_argument("--model", default="shipped:mobilenet_v2")
    k.add_argument("--studies", type=int, default=500)
    k.add_argument("--bad", type=float, default=0.1, help="share of bad inputs")
    k.add_argument("--kill-every", type=int, default=25, help="settled studies between two SIGKILLs of an actor")
    k.add_argument("--driver-kills", type=int, default=3, help="runs whose driver is SIGKILLed part-way")
    k.add_argument("--waves", type=int, default=4, help="arrivals of new studies between runs")
    k.add_argument("--actors", type=int, default=2)
    k.add_argument("--serve-requests", type=int, default=60, help="then the online service under replica kills (0: skip)")
    k.add_argument("--serve-kill-every", type=float, default=5.0, metavar="SECONDS")


def run_service_bench(a) -> int:
    """Run one of them; prints its JSON line (and table); exit code."""
    if a.what == "serve":
        from raysegment.service.load import markdown

        out = bench_serve_cli(a)
        print(json.dumps(out))
        print(markdown(out))
    elif a.what == "onnx":
        from raysegment.inference.evaluation import compare_runtimes

        out = compare_runtimes(a.model, a.data, a.split, a.threads)
        print(json.dumps(out))
        print(f"{out['model']}: {out['volumes']} {a.split} volumes, voxels equal {out['voxels_equal']:.4%} ({out['voxels_differ']} "
              f"of {out['voxels']} differ; lowest volume "
              f"{out['lowest_volume_equal']:.4%}); CPU s per volume ({a.threads} thread): torch fp32 "
              f"{out['torch_cpu_s_per_volume']}, ONNX Runtime {out['onnx_cpu_s_per_volume']}")
    elif a.what == "soak":
        from raysegment.soak.run import run_soak
        from raysegment.soak.runner import SoakConfig

        out = run_soak(SoakConfig(source=a.source, out=a.out, model=a.model, studies=a.studies, bad=a.bad,
                                  kill_every=a.kill_every, driver_kills=a.driver_kills, waves=a.waves, actors=a.actors,
                                  serve_requests=a.serve_requests, serve_kill_every_s=a.serve_kill_every))
        print(json.dumps(out))
        return 0 if out["passed"] else 1
    return 0


SAMPLE_VOLUME = Path(__file__).resolve().parents[1] / "sample" / "volumes" / "patient003_frame01.h5"


def bench_serve_cli(args) -> dict:
    """``bench serve``: the study (given, or the bundled sample's first volume as NIfTI), then
    ``raysegment.service.load.bench_serve``."""
    import tempfile

    from raysegment.cli.gpu_smoke import write_studies
    from raysegment.config import ServeConfig
    from raysegment.data.volumes import read_h5_volume
    from raysegment.service.load import bench_serve

    config = ServeConfig(model=args.model, predict=PredictConfig(precision=args.precision, runtime=args.runtime,
                                                                 in_plane=args.in_plane),
                         port=args.port, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(args.study) if args.study else write_studies([read_h5_volume(SAMPLE_VOLUME)], Path(tmp))[0]
        return bench_serve(config, study, args.clients, args.requests, tuple(args.replicas), args.kill_every)
