"""End to end with real processes: `ray start --head` (token auth), `mlflow server`, `ray job submit`.

tune → registry (champion alias) → pyfunc → scheduled-style batch inference, then a killed
inference run that resumes with every study exactly once.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synth import make_nifti_patient, synthetic_volume

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
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
    test's token path in their environment or its temp dir on their command line."""
    token = env["RAY_AUTH_TOKEN_PATH"].encode()

    def ours() -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if ray_tmp.encode() in (d / "cmdline").read_bytes() or token in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while ours() and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A token-auth Ray head, an MLflow server (sqlite + local artifacts) and an S3-compatible
    object store (moto) holding the runs, all on 127.0.0.1."""
    root = tmp_path_factory.mktemp("cluster")
    env = ray_env(root)
    gcs, dash, mlflow_port, s3_port = free_port(), free_port(), free_port(), free_port()
    # Credentials and endpoint reach every Ray process (and pyarrow's S3 client) as on a cluster.
    env.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    s3_log = open(root / "s3.log", "w")
    s3_proc = subprocess.Popen([f"{VENV_BIN}/moto_server", "-H", "127.0.0.1", "-p", str(s3_port)], env=env,
                               stdout=s3_log, stderr=subprocess.STDOUT, start_new_session=True)
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    mlflow_log = open(root / "mlflow.log", "w")
    mlflow_proc = subprocess.Popen(
        [f"{VENV_BIN}/mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        env=env, stdout=mlflow_log, stderr=subprocess.STDOUT, start_new_session=True)
    subprocess.run([f"{VENV_BIN}/ray", "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash),
                    "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "true",
                    "--disable-usage-stats", "--temp-dir", ray_tmp,
                    # Ports of its own: another Ray on the machine (a developer's run) holds the defaults,
                    # and a job agent that cannot bind leaves "No available agent to submit job".
                    "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                    "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())],
                   env=env, check=True, capture_output=True, cwd=root)
    uri = f"http://127.0.0.1:{mlflow_port}"
    try:
        wait_http(f"{uri}/health")
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


BUCKET = "raysegment-test"


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


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory):
    from raysegment.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("shards") / "sample"
    prepare(PrepareConfig(source=REPO / "raysegment" / "sample", out=out, progress=False))
    return out


TUNE_SMALL = ["--image-size", "96", "--crop-size", "96", "--cpus-per-worker", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def registered(cluster, sample_shards):
    """A first search (2 trials at once, fine-tuning the shipped weights, so its champion is clearly
    better than anything the later, deliberately bad searches make) registers a champion."""
    log = submit(cluster, "raysegment.tune", "--backbone", "mobilenet_v2", "--data", str(sample_shards),
                 "--mlflow-uri", cluster["mlflow"], "--num-samples", "2", "--concurrency", "2", "--epochs", "1",
                 "--init-weights", "shipped", "--set", "lr=0.0003", "--storage", cluster["s3"],
                 "--name", "first", *TUNE_SMALL, "--cpus-per-worker", "0.5", "--image-size", "256")
    assert "registered raysegment-mobilenet_v2 v1; champion: True" in log, log[-3000:]
    return log


def test_tune_job_registers_champion_with_dice_tags(cluster, registered):
    from mlflow import MlflowClient

    client = MlflowClient(cluster["mlflow"])
    champion = client.get_model_version_by_alias("raysegment-mobilenet_v2", "champion")
    for key in ("dice_rv", "dice_myo", "dice_lv", "dice_mean"):
        assert 0.0 <= float(champion.tags[key]) <= 1.0
    assert len(champion.tags["manifest_hash"]) == 64 and champion.tags["git_commit"]
    assert json.loads(champion.tags["config"])["model"]["backbone"] == "mobilenet_v2"
    # one parent run, one child run per trial with per-epoch Dice
    exp = client.get_experiment_by_name("raysegment-tune")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and len(runs) == 3
    history = client.get_metric_history(children[0].info.run_id, "dice_mean")
    assert len(history) >= 1 and {"lr", "decoder_width", "w_rv", "dice_fraction"} <= set(children[0].data.params)
    # --storage s3://…: the trials' checkpoints and the search's state are in the object store
    # (registration fetched the winner from there), nothing in a local folder named "s3:".
    import pyarrow.fs

    stored = [f.path for f in s3_fs(cluster["env"]).get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/runs/first", recursive=True))]
    assert any(p.endswith("/model.pt") for p in stored) and any(p.endswith("mlflow_parent_run.json") for p in stored)
    assert not (cluster["root"] / "s3:").exists()


def test_worse_search_does_not_move_champion_and_its_final_stage_registers_a_final_model(cluster, registered,
                                                                                       sample_shards):
    """A second search (1 trial at lr 1e-9, so worse) with a final stage: ray job submit -- raysegment.tune
    ... --final-minutes M trains the best trial's configuration from scratch and registers its last
    epoch as a final version, with lineage; neither moves the champion."""
    from mlflow import MlflowClient

    assert float(MlflowClient(cluster["mlflow"]).get_model_version("raysegment-mobilenet_v2", "1").tags["dice_mean"]) > 0.5
    log = submit(cluster, "raysegment.tune", "--backbone", "mobilenet_v2", "--data", str(sample_shards),
                 "--mlflow-uri", cluster["mlflow"], "--num-samples", "1", "--epochs", "1", "--set", "lr=1e-9",
                 "--final-minutes", "0.1", "--storage", cluster["s3"], "--name", "worse", *TUNE_SMALL)
    assert "registered raysegment-mobilenet_v2 v2; champion: False" in log, log[-3000:]
    assert "[raysegment] final run: trial" in log, log[-3000:]
    assert "registered final raysegment-mobilenet_v2 v3; champion: False" in log, log[-3000:]
    client = MlflowClient(cluster["mlflow"])
    assert client.get_model_version_by_alias("raysegment-mobilenet_v2", "champion").version == "1"
    v1, v2 = (client.get_model_version("raysegment-mobilenet_v2", v) for v in ("1", "2"))
    assert float(v2.tags["dice_mean"]) <= float(v1.tags["dice_mean"])
    assert "final" not in v2.tags
    tags = client.get_model_version("raysegment-mobilenet_v2", "3").tags
    assert tags["final"] == "true"
    assert {"dice_rv", "dice_myo", "dice_lv", "dice_mean", "source_trial", "search_run", "manifest_hash"} <= set(tags)
    config = json.loads(tags["config"])
    assert config["time_budget_min"] == 0.1 and config["lr"] == 1e-9  # the best trial's configuration
    # Lineage: the final run is a child of the search's parent run and names the trial it came from.
    parent = client.get_run(tags["search_run"])
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    final_run = [r for r in runs if r.data.tags.get("final") == "true"]
    assert len(final_run) == 1 and final_run[0].data.tags["source_trial"] == tags["source_trial"]
    assert len(client.get_metric_history(final_run[0].info.run_id, "dice_mean")) >= 1
    assert [r for r in runs if r.data.tags.get("tune_trial_id") == tags["source_trial"]]


def test_champion_loads_through_pyfunc(cluster, registered):
    import mlflow

    mlflow.set_tracking_uri(cluster["mlflow"])
    from raysegment.predict import Predictor

    model = mlflow.pyfunc.load_model("models:/raysegment-mobilenet_v2@champion")
    image, _ = synthetic_volume(1, shape=(3, 60, 70))
    raw = (image * 900).astype(np.float32)
    mask = model.predict(raw)
    assert mask.shape == (3, 60, 70) and mask.dtype == np.uint8
    # The registered pyfunc is the batch job's Predictor: the same mask, with and without spacing.
    predictor = Predictor.load("models:/raysegment-mobilenet_v2@champion", tracking_uri=cluster["mlflow"])
    assert predictor.version == "raysegment-mobilenet_v2/1"
    np.testing.assert_array_equal(mask, predictor.predict(raw))
    spaced = model.predict(raw, params={"spacing_mm": [8.0, 0.7, 0.7]})
    np.testing.assert_array_equal(spaced, predictor.predict(raw, spacing=(8.0, 0.7, 0.7)))


def test_champion_stays_when_the_new_version_was_scored_on_another_manifest(cluster, registered, tmp_path):
    from mlflow import MlflowClient

    from raysegment.registry import register_checkpoint
    from raysegment.weights import checkpoint_from_weights, shipped_weights

    ckpt = checkpoint_from_weights(shipped_weights("mobilenet_v2"), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["manifest_hash"] = "0" * 64  # another data set: its Dice says nothing about this one
    (ckpt / "config.json").write_text(json.dumps(config))
    reg = register_checkpoint(ckpt, metrics={"dice_rv": 0.99, "dice_myo": 0.99, "dice_lv": 0.99, "dice_mean": 0.99},
                              tracking_uri=cluster["mlflow"])
    assert not reg.champion and "another data manifest" in reg.reason
    client = MlflowClient(cluster["mlflow"])
    assert client.get_model_version_by_alias("raysegment-mobilenet_v2", "champion").version == "1"
    assert client.get_model_version("raysegment-mobilenet_v2", reg.version).tags["manifest_hash"] == "0" * 64


def test_registry_import_scores_the_file_here_and_never_promotes_a_claim(cluster, sample_shards, tmp_path):
    """A file can claim any Dice: garbage weights claiming .99 are registered but never champion
    (unscored: tagged evaluated=false; scored on --data: below the sanity floor); the shipped file,
    scored on the sample's val split, becomes champion with the Dice measured here."""
    import torch
    from mlflow import MlflowClient

    from conftest import write_checkpoint
    from raysegment import registry
    from raysegment.config import ModelConfig, TrainConfig
    from raysegment.metrics import dice_summary
    from raysegment.models import build_model
    from raysegment.report import evaluate
    from raysegment.weights import export_weights, shipped_weights

    torch.manual_seed(3)
    config = TrainConfig(data="x", model=ModelConfig(backbone="densenet121", decoder_width=8), image_size=64)
    claim = {"epoch": 9, "metrics": {"dice_rv": 0.99, "dice_myo": 0.99, "dice_lv": 0.99, "dice_mean": 0.99}}
    garbage = export_weights(write_checkpoint(tmp_path / "g", build_model(config.model).eval(), config, claim),
                             tmp_path / "garbage.safetensors")
    client = MlflowClient(cluster["mlflow"])
    assert registry.main(["import", str(garbage), "--mlflow-uri", cluster["mlflow"]]) == 0
    assert registry.main(["import", str(garbage), "--data", str(sample_shards), "--mlflow-uri", cluster["mlflow"]]) == 0
    unscored, scored = (client.get_model_version("raysegment-densenet121", v) for v in ("1", "2"))
    assert unscored.tags["evaluated"] == "false" and float(scored.tags["dice_mean"]) < 0.1
    assert not client.get_registered_model("raysegment-densenet121").aliases  # neither moved the alias

    path = shipped_weights("densenet121")
    assert registry.main(["import", str(path), "--data", str(sample_shards), "--mlflow-uri", cluster["mlflow"]]) == 0
    champion = client.get_model_version_by_alias("raysegment-densenet121", "champion")
    expected = dice_summary(evaluate(str(path), sample_shards, splits=("val",)))
    assert champion.version == "3" and float(champion.tags["dice_mean"]) == pytest.approx(expected["dice_mean"], abs=1e-6)
    assert json.loads(champion.tags["config"])["model"]["context_slices"] == 1
    assert "evaluated" not in champion.tags
    # The version's weights digest is checked on every load: replaced weights in the artifact store
    # (another valid state dict) are refused.
    from raysegment.checkpoint import DamagedWeights, state_digest
    from raysegment.predict import Predictor

    stored = [p for p in (cluster["root"] / "artifacts").rglob("model.pt")
              if state_digest(torch.load(p, weights_only=True)) == champion.tags["weights_sha256"]]
    assert len(stored) == 1
    state = torch.load(stored[0], weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 0.01
    torch.save(state, stored[0])
    with pytest.raises(DamagedWeights, match="do not match the digest"):
        Predictor.load(f"models:/raysegment-densenet121/{champion.version}", tracking_uri=cluster["mlflow"])


def _studies(root: Path, n_extra: int = 0) -> None:
    make_nifti_patient(root, 7, ed=1, es=5, nframes=6)
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00broken gzip stream")
    (root / "zero.nii").write_bytes(b"")
    img, _ = synthetic_volume(3, shape=(4, 50, 60))
    cine = np.stack([img, img * 0.9, img], axis=-1)
    affine = np.array([[0.0, 1.4, 0.1, -20], [1.3, 0.0, 0.0, 15], [0.0, 0.2, 9.0, 3], [0, 0, 0, 1]])  # oblique
    nib.save(nib.Nifti1Image((np.transpose(cine, (2, 1, 0, 3)) * 1500).astype(np.int16), affine), str(root / "cine_4d.nii.gz"))
    for i in range(n_extra):
        img, _ = synthetic_volume(20 + i, shape=(4, 48, 48))
        nib.save(nib.Nifti1Image((np.transpose(img, (2, 1, 0)) * 800).astype(np.int16), np.diag([1.5, 1.5, 8, 1])),
                 str(root / f"extra{i:02d}.nii.gz"))


def test_scheduled_inference_job(cluster, registered, tmp_path):
    import pyarrow.parquet as pq

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _studies(inp)
    args = ["raysegment.infer", "--model", "models:/raysegment-mobilenet_v2@champion", "--input", str(inp),
            "--output", str(out), "--mlflow-uri", cluster["mlflow"], "--threads", "1", "--actors", "1"]
    log = submit(cluster, *args)
    assert "6 to segment" in log  # frame01, frame05, _4d of patient007, corrupt, zero, cine_4d
    rows = pq.read_table(out / "results.parquet").to_pylist()
    failed = {Path(r["study"]).name: r["reason"] for r in rows if r["status"] == "failed"}
    assert set(failed) == {"corrupt.nii.gz", "zero.nii"}
    assert "0 bytes" in failed["zero.nii"] and "unreadable" in failed["corrupt.nii.gz"]
    done = [r for r in rows if r["status"] == "done"]
    assert {Path(r["study"]).name for r in done} == {"patient007_frame01.nii.gz", "patient007_frame05.nii.gz",
                                                        "patient007_4d.nii.gz", "cine_4d.nii.gz"}
    for r in done:
        src, seg = nib.load(r["study"]), nib.load(r["mask"])
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
        assert seg.get_data_dtype() == np.uint8
        assert r["model_version"] == "raysegment-mobilenet_v2/1"
    ed = next(r for r in done if r["study"].endswith("frame01.nii.gz"))
    es = next(r for r in done if r["study"].endswith("frame05.nii.gz"))
    assert ed["phase"] == "ED" and es["phase"] == "ES" and 0 <= ed["dice_lv"] <= 1 and ed["volume_lv_ml"] >= 0
    if ed["volume_lv_ml"] > 0:  # ED and ES of patient007 both segmented: EF from their LV volumes
        expected = 100 * (ed["volume_lv_ml"] - es["volume_lv_ml"]) / ed["volume_lv_ml"]
        assert ed["ef_lv_pct"] == pytest.approx(expected) and es["ef_lv_pct"] == pytest.approx(expected)
    assert len([r for r in done if r["study"].endswith("cine_4d.nii.gz")]) == 3  # every frame
    assert (out / "report.md").read_text().count("![") >= 4

    # The next scheduled run: what is done (or failed for good) is skipped, a new study is picked up.
    img, _ = synthetic_volume(9, shape=(4, 40, 40))
    nib.save(nib.Nifti1Image((np.transpose(img, (2, 1, 0)) * 100).astype(np.int16), np.diag([1.2, 1.2, 7, 1])),
             str(inp / "new_study.nii.gz"))
    log = submit(cluster, *args)
    assert "7 studies, 6 already done" in log and "1 to segment" in log and "new_study.nii.gz ok" in log
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 7 and len({e["path"] for e in ledger}) == 7


def test_killed_inference_resumes_exactly_once(cluster, registered, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _studies(inp, n_extra=10)
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    cmd = [sys.executable, "-m", "raysegment.infer", "--model", "models:/raysegment-mobilenet_v2@champion",
           "--input", str(inp), "--output", str(out), "--mlflow-uri", cluster["mlflow"], "--threads", "1", "--actors", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ledger = out / "ledger.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and (not ledger.exists() or len(ledger.read_text().splitlines()) < 3):
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = len(ledger.read_text().splitlines())
    assert 3 <= first < 16
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    paths = [e["path"] for e in entries]
    assert len(paths) == len(set(paths)) == 16  # every study once, none lost
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert len(masks) == 14 and not [m for m in masks if m.startswith(".partial")]
    import pyarrow.parquet as pq

    studies = {r["study"] for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert len(studies) == 16


def test_ensemble_version_averages_its_members_everywhere(cluster, registered, sample_shards, tmp_path):
    """registry ensemble: members pinned, its own val Dice, and the pyfunc, Predictor.load and infer
    (--model repeated, or the ensemble's URI) give the members' softmax average."""
    import mlflow
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from raysegment import registry
    from raysegment.metrics import dice_summary
    from raysegment.predict import Predictor
    from raysegment.report import evaluate

    from raysegment.weights import shipped_weights

    files = ["models:/raysegment-mobilenet_v2/1", str(shipped_weights("mobilenet_v2"))]
    assert registry.main(["ensemble", "--member", "models:/raysegment-mobilenet_v2@champion", "--member", files[1],
                          "--data", str(sample_shards), "--mlflow-uri", cluster["mlflow"]]) == 0
    client = MlflowClient(cluster["mlflow"])
    v = client.get_model_version_by_alias("raysegment-ensemble", "champion")
    assert json.loads(v.tags["members"])[0] == "raysegment-mobilenet_v2/1" and v.tags["flip_tta"] == "false"
    expected = dice_summary(evaluate(files, sample_shards, splits=("val",), tracking_uri=cluster["mlflow"]))
    assert float(v.tags["dice_mean"]) == pytest.approx(expected["dice_mean"], abs=1e-6)

    image, _ = synthetic_volume(2, shape=(3, 60, 70))
    raw = (image * 700).astype(np.float32)
    direct = Predictor.load(files, tracking_uri=cluster["mlflow"])
    registered_ensemble = Predictor.load("models:/raysegment-ensemble@champion", tracking_uri=cluster["mlflow"])
    assert len(registered_ensemble.members) == 2 and registered_ensemble.version == f"raysegment-ensemble/{v.version}"
    np.testing.assert_array_equal(registered_ensemble.predict(raw), direct.predict(raw))
    mlflow.set_tracking_uri(cluster["mlflow"])
    pyfunc = mlflow.pyfunc.load_model("models:/raysegment-ensemble@champion")
    np.testing.assert_array_equal(pyfunc.predict(raw), direct.predict(raw))

    inp, out = tmp_path / "in", tmp_path / "out"
    make_nifti_patient(inp, 8, ed=1, es=4, nframes=4)
    log = submit(cluster, "raysegment.infer", *[x for f in files for x in ("--model", f)], "--input", str(inp),
                 "--output", str(out), "--mlflow-uri", cluster["mlflow"], "--threads", "1", "--actors", "1")
    assert "3 to segment" in log
    rows = [r for r in pq.read_table(out / "results.parquet").to_pylist() if r["study"].endswith("frame04.nii.gz")]
    seg = np.transpose(np.asarray(nib.load(rows[0]["mask"]).dataobj), (2, 1, 0))
    study = nib.load(rows[0]["study"])
    frame = np.transpose(np.asarray(study.dataobj, dtype=np.float64), (2, 1, 0))
    spacing = tuple(float(z) for z in study.header.get_zooms()[:3])[::-1]
    np.testing.assert_array_equal(seg, direct.predict(frame, spacing=spacing))
    assert rows[0]["model_version"] == direct.version == "raysegment-mobilenet_v2/1+" + direct.members[1].version
