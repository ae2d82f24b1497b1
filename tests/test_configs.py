"""Offline checks of everything in jobs/ and cluster/.

* every YAML parses; the Ray cluster launcher file validates against Ray's own schema
  (``ray-schema.json``, the check ``ray up`` runs first);
* Kubernetes manifests pass structural checks of the fields we rely on (no cluster or network
  here for ``kubectl --dry-run=server`` or kubeconform schemas);
* every raysegment entrypoint written in a job spec (RayJob, CronJob, systemd, cron, submit.sh
  examples) is dry-run through that module's own argument parser;
* shell scripts pass ``bash -n``.
"""

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted(list((REPO / "jobs").glob("*.yaml")) + list((REPO / "cluster").rglob("*.yaml")))
SCRIPTS = sorted((REPO / "jobs").glob("*.sh"))
K8S = [p for p in YAMLS if any("apiVersion" in (d or {}) for d in yaml.safe_load_all(p.read_text()))]
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def pod_specs(obj):
    """Every pod spec (a dict with ``containers``) anywhere inside ``obj``."""
    if isinstance(obj, dict):
        if "containers" in obj:
            yield obj
        for v in obj.values():
            yield from pod_specs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from pod_specs(v)


def dry_run(argv: list[str]) -> None:
    """``python -m raysegment.X ARGS`` → parse ARGS with X's parser (SystemExit on a bad flag)."""
    i = argv.index("-m")
    module = argv[i + 1]
    assert module.startswith("raysegment."), argv
    importlib.import_module(module).build_parser().parse_args(argv[i + 2:])


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_parses(path):
    assert docs(path)


def test_ray_cluster_launcher_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
    broken = prepare_config(config)
    broken["available_node_types"]["bogus"] = {"resources": {}}
    with pytest.raises(Exception, match="node_config"):
        validate_config(broken)  # the schema check is real


@pytest.mark.parametrize("path", K8S, ids=[p.name for p in K8S])
def test_kubernetes_manifest_structure(path, tmp_path):
    objects = docs(path)
    for d in objects:
        assert d.get("kind") and d.get("metadata", {}).get("name"), d
        assert d["kind"] not in ("Ingress",), "nothing is exposed outside the cluster"
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP"
        for pod in pod_specs(d.get("spec", {})):
            for c in pod["containers"]:
                assert c.get("name") and c.get("image"), c
                for e in c.get("env", []):
                    assert "name" in e and ("value" in e or "valueFrom" in e), e
                    assert not isinstance(e.get("value", ""), (int, float, bool)), f"env values are strings: {e}"
                mounts = {m["name"] for m in c.get("volumeMounts", [])}
                assert mounts <= {v["name"] for v in pod.get("volumes", [])}, f"{c['name']}: undeclared volume"
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                runs = c["image"] + " ".join(c.get("command", []) + c.get("args", []))
                if "raysegment" in runs or "rayproject" in runs:
                    assert env.get("RAY_USAGE_STATS_ENABLED") == "0", f"{c['name']}: Ray telemetry not off"
                if "mlflow" in runs:
                    assert env.get("MLFLOW_DISABLE_TELEMETRY") == "true", f"{c['name']}: MLflow telemetry not off"
                if "mlflow server" in runs:
                    assert env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false", f"{c['name']}: job runner on"
        if d["kind"] == "RayCluster":
            spec = d["spec"]
            assert spec["authOptions"]["mode"] == "token"
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
            kinds = set()
            for g in spec["workerGroupSpecs"]:
                assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
                pod = g["template"]["spec"]
                for c in pod["containers"]:
                    req = c["resources"]["requests"]
                    gpu = "nvidia.com/gpu" in req
                    kinds.add(gpu)
                    # a whole 8-vCPU / 32 GiB node is never schedulable: the kubelet keeps some
                    assert float(req["cpu"]) <= 7 and int(req["memory"].rstrip("Gi")) <= 28, req
                    if gpu:
                        assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), "GPU taint"
                        assert {"NCCL_SOCKET_IFNAME", "NCCL_DEBUG"} <= {e["name"] for e in c["env"]}
            assert kinds == {True, False}, "a GPU group and a CPU group (CPU-only demand must not wake GPU nodes)"
            for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                for c in g["template"]["spec"]["containers"]:  # every Ray pod logs in to MLflow from a Secret
                    env = {e["name"]: e for e in c["env"]}
                    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-client"
        if d["kind"] == "RayJob":
            assert d["spec"].get("clusterSelector") or d["spec"].get("rayClusterSpec")
            dry_run(shlex.split(d["spec"]["entrypoint"]))
            assert yaml.safe_load(d["spec"]["runtimeEnvYAML"])["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
        if d["kind"] == "RayService":
            _check_ray_service(d, tmp_path)
        if d["kind"] == "CronJob":
            fields = d["spec"]["schedule"].split()
            assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields)
            assert d["spec"].get("concurrencyPolicy") == "Forbid"
            pod = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            assert pod["restartPolicy"] in ("Never", "OnFailure")
            for c in pod["containers"]:
                cmd = c["command"] + c.get("args", [])
                if "--" in cmd:
                    dry_run(cmd[cmd.index("--") + 1:])
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow":
            cmd = d["spec"]["template"]["spec"]["containers"][0]["command"]
            assert cmd[cmd.index("--app-name") + 1] == "basic-auth", "MLflow without auth: anyone moves champion"
            policies = [p for p in objects if p["kind"] == "NetworkPolicy"
                        and p["spec"]["podSelector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert policies and all(src["podSelector"]["matchLabels"] == {"ray.io/cluster": "raysegment"}
                                    for p in policies for rule in p["spec"]["ingress"] for src in rule["from"])
    services = [d for d in objects if d["kind"] == "Service"]
    workloads = [d for d in objects if d["kind"] in ("Deployment", "StatefulSet")]
    for s in services:  # each Service selects a workload in the same file
        assert any(s["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in workloads), s["metadata"]["name"]


def _check_ray_service(d: dict, tmp_path: Path) -> None:
    """A RayService: token auth, ClusterIP, and a Serve config whose application builder accepts its args."""
    from raysegment.service.run import config_from_dict

    spec = d["spec"]
    assert spec["rayClusterConfig"]["authOptions"]["mode"] == "token"
    assert spec["rayClusterConfig"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    for app in serve_config["applications"]:
        module, _, builder = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), builder))
        assert app["runtime_env"]["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
        args = dict(app["args"])
        token = tmp_path / "token"
        token.write_text("t0ken\n")
        mounted = {m["mountPath"] for g in [spec["rayClusterConfig"]["headGroupSpec"], *spec["rayClusterConfig"]["workerGroupSpecs"]]
                   for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert str(Path(args["token_file"]).parent) in mounted, "the token file is a mounted Secret"
        config = config_from_dict({**args, "token_file": str(token)})
        assert config.token == "t0ken" and config.model.startswith("models:/") and config.autoscale
    with pytest.raises(ValueError, match="unknown service settings"):
        config_from_dict({"model": "x", "replica": 2})  # a misspelt setting is refused, not ignored


def _submit_sh_lines() -> list[list[str]]:
    """`jobs/submit.sh STAGE ARGS` invocations in the job files, with shell variables filled in."""
    out = []
    for f in sorted(p for p in (REPO / "jobs").rglob("*") if p.is_file()):
        for line in f.read_text().splitlines():
            m = re.search(r"submit\.sh\"?\s+(tune|train|infer|prepare)\s+(.*?)('|$|>>)", line)
            if m:
                args = re.sub(r'"?\$[A-Z_]+"?', "VALUE", m.group(2))
                out.append(["python", "-m", f"raysegment.{m.group(1)}", *shlex.split(args)])
    return out


def test_job_entrypoints_dry_run():
    lines = _submit_sh_lines()
    stages = {argv[2] for argv in lines}
    assert {"raysegment.tune", "raysegment.train", "raysegment.infer"} <= stages, stages
    for argv in lines:
        dry_run(argv)
    with pytest.raises(SystemExit):
        dry_run(["python", "-m", "raysegment.tune", "--no-such-flag"])  # the dry-run can fail


def test_runtime_env_turns_telemetry_off():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["env_vars"]
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_long_runs_pause_reaches_the_training_driver_not_its_logging_wrapper(tmp_path):
    """``jobs/long-runs.sh pause NAME`` Ctrl-Cs the run's python process. ``start`` runs each run as
    ``bash -c "echo start; python -m raysegment.train … --name NAME …; echo exit"``; a SIGINT sent to
    that wrapper never reaches python (a non-interactive bash waits its child out), so the run went on.
    The script's own ``start`` launches the run, on a stand-in snapshot of the code at HEAD."""
    import os
    import sys
    import time

    root = tmp_path / "raysegment-runs"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    fake = root / f"code-{commit}" / "raysegment"  # start uses a snapshot that exists as it is
    fake.mkdir(parents=True)
    (root / "shards").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "train.py").write_text(
        # its own SIGINT handler, as Ray installs in the real driver (a `cmd &` starts with SIGINT ignored)
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGINT, lambda *_: (pathlib.Path({str(tmp_path / 'stopped')!r}).touch(), sys.exit(130)))\n"
        f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
        "time.sleep(60)\n")
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = ["bash", str(REPO / "jobs" / "long-runs.sh")]
    try:
        subprocess.run([*script, "start", "fake-run", "--minutes", "5"], env=env, check=True, timeout=30)
        for _ in range(300):  # until python has its handler and waits (slow on a loaded machine)
            if (tmp_path / "ready").exists():
                break
            time.sleep(0.1)
        out = subprocess.run([*script, "pause", "fake-run"], env=env, capture_output=True, text=True, timeout=30)
        assert "Ctrl-C sent" in out.stdout, out
        for _ in range(300):
            if "== exit" in (root / "fake-run.log").read_text():
                break
            time.sleep(0.1)
    finally:
        subprocess.run(["pkill", "-9", "-f", f"raysegment.train .*--storage {root} --name fake-run"])
    assert (tmp_path / "stopped").exists() and "== exit 130" in (root / "fake-run.log").read_text()


def test_ship_refuses_a_run_that_has_not_ended_and_leaves_the_shipped_files_alone(tmp_path):
    """``jobs/ship.sh NAME`` ships only a run whose budget ended it (``== exit 0`` in its log): a run
    stopped by Ctrl-C (exit 130) is mid-schedule, and its latest epoch is not what the command makes."""
    import hashlib
    import os
    import sys

    root = tmp_path / "raysegment-runs"
    (root / "shards").mkdir(parents=True)
    (root / "half-run.log").write_text("== start 2026-12-04T07:00:00Z code abc\n== exit 130 2026-12-04T08:00:00Z\n")
    shipped = REPO / "raysegment" / "shipped"

    def digests():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shipped.iterdir()) if p.is_file()}

    before = digests()
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(REPO / "jobs" / "ship.sh"), "half-run"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "run half-run has not ended" in out.stderr, out
    assert digests() == before and not list(root.glob("ship-*"))
    usage = subprocess.run(["bash", str(REPO / "jobs" / "ship.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "jobs/ship.sh NAME" in usage.stdout
