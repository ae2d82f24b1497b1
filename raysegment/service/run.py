"""Deploying the service on Ray Serve (local Ray, or the cluster ``RAY_ADDRESS`` names) and
finding its replicas' processes (for the load test's replica kills).

Imports ``service.app``, ``config`` and ``runtime``; not ``training``, ``soak`` or ``cli``.
"""

from __future__ import annotations

from raysegment.config import ServeConfig
from raysegment.runtime import ensure_ray, read_secret

APP_NAME, DEPLOYMENT = "raysegment", "segmenter"


def application(config: ServeConfig, verbose: bool = False):
    """The bound Serve application: ``SegmentService`` with its replicas (fixed or autoscaled), each
    holding ``cpus_per_replica`` CPUs and ``gpus_per_replica`` GPUs."""
    from ray import serve

    from raysegment.service.app import SegmentService

    options = {"ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
               # a replica segments one volume at a time; a few more wait in it, the rest at the proxy
               "max_ongoing_requests": 4, "health_check_period_s": 2.0, "health_check_timeout_s": 30.0,
               "graceful_shutdown_timeout_s": 20.0,
               # a line per request belongs in the replica's log file, not on the operator's terminal
               "logging_config": {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}}
    if config.autoscale:
        lo, hi = config.autoscale
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": 1,
                                         "upscale_delay_s": 5, "downscale_delay_s": 120}
    else:
        options["num_replicas"] = config.replicas
    return serve.deployment(SegmentService, name=DEPLOYMENT).options(**options).bind(config)


def start(config: ServeConfig, verbose: bool = False) -> str:
    """Deploy and wait until every replica has loaded its model → the service's base URL."""
    import logging

    from ray import serve

    ensure_ray(verbose=verbose)
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": config.host, "port": config.port,
                              "request_timeout_s": config.request_timeout_s},
                logging_config={"log_level": "INFO" if verbose else "WARNING"})
    serve.run(application(config, verbose), name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}"


def stop() -> None:
    from ray import serve

    serve.shutdown()


def replica_pids() -> list[int]:
    """Process ids of the service's live replicas (this node's Ray)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if a.class_name.endswith(f"{APP_NAME}:{DEPLOYMENT}") and a.pid]


def config_from_dict(args: dict) -> ServeConfig:
    """A ServeConfig from plain values (a Serve config file's ``args``, a KubeRay RayService):
    ServeConfig's field names, ``predict`` as a dict of PredictConfig's, ``autoscale`` as "MIN:MAX",
    ``token_file`` a file holding the bearer token, ``pacs_auth_file`` one holding the PACS's
    credentials (mounted Secrets; ``runtime.read_secret``). Unknown keys, an empty or unreadable secret
    and credentials of no known form are refused (ValueError)."""
    from dataclasses import fields

    from raysegment.config import PredictConfig

    args = dict(args)
    secrets = {"token_file": "token", "pacs_auth_file": "pacs_auth"}  # a mounted Secret's file → the setting
    known = {f.name for f in fields(ServeConfig)} | set(secrets)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown service settings {unknown}; known: {sorted(known)}")
    for key, setting in secrets.items():
        if key in args:
            try:
                args[setting] = read_secret(args.pop(key))
            except ValueError as exc:
                raise ValueError(f"{key} {exc}") from None
    if args.get("pacs_auth") is not None:
        from raysegment.io.dicomweb import check_auth

        try:
            check_auth(args["pacs_auth"])
        except ValueError as exc:
            raise ValueError(f"pacs_auth_file: {exc}") from None
    if isinstance(args.get("autoscale"), str):
        lo, hi = args["autoscale"].split(":")
        args["autoscale"] = (int(lo), int(hi))
    if isinstance(args.get("predict"), dict):
        args["predict"] = PredictConfig(**{"in_plane": "auto", **args["predict"]})  # as the ServeConfig default
    return ServeConfig(**args)


def build_app(args: dict):
    """Serve's application builder (``import_path: raysegment.service.run:build_app``), for
    ``serve run`` config files and KubeRay's RayService; ``args`` as ``config_from_dict``."""
    return application(config_from_dict(args))
