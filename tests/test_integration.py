"""End to end with real processes (tests/servers.py): `ray start --head` (token auth), `mlflow
server`, a moto S3 holding the runs, `ray job submit`: one search with its final stage registers
two versions under the champion rule, the champion serves through the pyfunc.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from servers import BUCKET, s3_fs, submit
from synth import synthetic_volume

pytestmark = pytest.mark.slow


TUNE_SMALL = ["--image-size", "96", "--crop-size", "96", "--cpus-per-worker", "1", "--threads", "1"]


def _search_command(cluster, sample_shards) -> list[str]:
    return ["raysegment.tune", "--backbone", "mobilenet_v2", "--data", str(sample_shards), "--mlflow-uri",
            cluster["mlflow"], "--num-samples", "2", "--concurrency", "2", "--epochs", "1", "--init-weights", "shipped",
            "--set", "lr=0.0003", "--range", "w_rv=1:1.5", "--storage", cluster["s3"], "--final-minutes", "0.1",
            "--name", "first", *TUNE_SMALL, "--cpus-per-worker", "0.5", "--image-size", "256", "--max-steps-per-epoch", "4"]


@pytest.fixture(scope="module")
def registered(cluster, sample_shards):
    """One search job: 2 trials at once, fine-tuning the shipped weights, then the final stage
    (the best trial's configuration trained again as one Ray Train run for 0.1 min), runs on S3."""
    log = submit(cluster, *_search_command(cluster, sample_shards))
    assert "registered raysegment-mobilenet_v2 v1; champion: True" in log, log[-3000:]
    assert "[raysegment] final run: trial" in log, log[-3000:]
    assert "registered final raysegment-mobilenet_v2 v2; champion:" in log, log[-3000:]
    # Ray Train's placement-group cleaner warns of a dead controller for a trial Tune stops, and the
    # GCS may log a "failed" kill of an actor already gone: the driver prints neither
    # (``console.quiet_driver_logs``).
    assert "Ray Train controller actor" not in log and "Failed to kill actor" not in log, log[-3000:]
    assert "worker processes have been started" not in log, log[-3000:]  # the raylet's, in such a search here
    # the core worker's ERROR about Ray Train's preemption watcher, which runs on a cluster (ray#53727)
    assert "has constructor arguments in the object store" not in log, log[-3000:]
    # Each trial's actor runs its dataset's first pass; Ray Data's note that the bars are off (we
    # switched them off) came once per trial.
    assert "Progress bars disabled" not in log, log[-3000:]
    # Neither Tune's configuration box (with its results folder and TensorBoard hint) nor MLflow's
    # INFO lines (e.g. its wait for each registered version): the quiet console is ours.
    for line in ("Configuration for experiment", "View detailed results", "tensorboard --logdir", "Waiting up to"):
        assert line not in log, log[-3000:]
    return log


def champion_version(cluster) -> str:
    from mlflow import MlflowClient

    return MlflowClient(cluster["mlflow"]).get_model_version_by_alias("raysegment-mobilenet_v2", "champion").version


def test_tune_job_registers_champion_with_dice_tags(cluster, registered):
    from mlflow import MlflowClient

    client = MlflowClient(cluster["mlflow"])
    champion = client.get_model_version_by_alias("raysegment-mobilenet_v2", "champion")
    for key in ("dice_rv", "dice_myo", "dice_lv", "dice_mean"):
        assert 0.0 <= float(champion.tags[key]) <= 1.0
    assert len(champion.tags["manifest_hash"]) == 64 and champion.tags["git_commit"]
    assert json.loads(champion.tags["config"])["model"]["backbone"] == "mobilenet_v2"
    # `train --recipe models:/…` reads the version's recipe from the registry: the search's trial config
    from raysegment.cli.recipe import load_recipe
    from raysegment.config import TrainConfig

    assert load_recipe("models:/raysegment-mobilenet_v2@champion", cluster["mlflow"]) == \
        TrainConfig.from_dict(json.loads(champion.tags["config"]))
    # one parent run, one child run per trial with per-epoch Dice (and the final run's)
    exp = client.get_experiment_by_name("raysegment-tune")
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("final") != "true"]
    assert len(trials) == 2 and len(runs) == 4
    history = client.get_metric_history(trials[0].info.run_id, "dice_mean")
    assert sorted(m.step for m in history)[0] == 1  # epochs counted from 1, as the console counts them
    assert len(history) >= 1 and {"lr", "decoder_width", "w_rv", "dice_fraction"} <= set(trials[0].data.params)
    # --range w_rv=1:1.5 (the default is 0.5:2), recorded on the parent run; --set pins lr
    assert all(1.0 <= float(t.data.params["w_rv"]) <= 1.5 and float(t.data.params["lr"]) == 3e-4 for t in trials)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["range_w_rv"] == "1:1.5" and float(parent.data.params["fixed_lr"]) == 3e-4
    # the search at a glance: its picture in the parent run (beside the registered best trial's masks)
    assert "figures/search.png" in [a.path for a in client.list_artifacts(parent.info.run_id, "figures")]
    # --storage s3://…: the trials' checkpoints and the search's state are in the object store
    # (registration fetched the winner from there), nothing in a local folder named "s3:".
    import pyarrow.fs

    stored = [f.path for f in s3_fs(cluster["env"]).get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/runs/first", recursive=True))]
    assert any(p.endswith("/model.pt") for p in stored) and any(p.endswith("mlflow_parent_run.json") for p in stored)
    assert any("first-final" in p for p in stored)  # the final run (a Ray Train run) wrote there too
    assert not (cluster["root"] / "s3:").exists()


def test_the_same_search_command_again_prints_its_result_and_registers_nothing(cluster, registered, sample_shards):
    """The finished search's command again (as after a sitting ended): one line that it has finished,
    the same trial table and registrations, read from its storage folder on S3: no trial, no new
    version. (It started Ray Tune to find that out.)"""
    from mlflow import MlflowClient

    client = MlflowClient(cluster["mlflow"])
    versions = len(client.search_model_versions("name='raysegment-mobilenet_v2'"))
    again = submit(cluster, *_search_command(cluster, sample_shards))
    assert "[raysegment] search first has finished: nothing to search (another --name starts a new one)" in again
    def report(log: str) -> list[str]:  # the trial table, the final model, the registrations
        return [line for line in log.splitlines()
                if " -> dice rv " in line or line.startswith(("[raysegment] registered", "[raysegment] final model"))]

    assert len(report(registered)) == 5 and report(again) == report(registered), again[-3000:]
    assert "started:" not in again and "epoch 1/" not in again, again[-3000:]
    assert len(client.search_model_versions("name='raysegment-mobilenet_v2'")) == versions


def test_final_stage_registers_the_best_trials_configuration_with_lineage_under_the_champion_rule(cluster, registered):
    """ray job submit -- raysegment.training.tune ... --final-minutes M: the best trial's configuration trained
    again and its last epoch registered as a final version with lineage; the champion is whichever
    version has the higher val Dice (the rule is unchanged)."""
    from mlflow import MlflowClient

    client = MlflowClient(cluster["mlflow"])
    v1, v2 = (client.get_model_version("raysegment-mobilenet_v2", v) for v in ("1", "2"))
    assert "final" not in v1.tags and v2.tags["final"] == "true"
    # Both name the search and trial they came from (v1: the best trial's best epoch), in tags and in words.
    assert v1.tags["search_run"] == v2.tags["search_run"] and v1.tags["source_trial"] and int(v1.tags["epoch"]) >= 1
    assert f"trial {v1.tags['source_trial']}, epoch {v1.tags['epoch']}" in v1.description, v1.description
    assert f"final run of search run {v2.tags['search_run']}" in v2.description and "champion when registered" in v2.description
    assert {"dice_rv", "dice_myo", "dice_lv", "dice_mean", "source_trial", "search_run", "manifest_hash"} <= set(v2.tags)
    config = json.loads(v2.tags["config"])
    assert config["time_budget_min"] == 0.1 and config["lr"] == 0.0003  # the best trial's configuration
    best = max((v1, v2), key=lambda v: float(v.tags["dice_mean"]))
    assert champion_version(cluster) == best.version
    # Lineage: the final run is a child of the search's parent run and names the trial it came from.
    parent = client.get_run(v2.tags["search_run"])
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    final_run = [r for r in runs if r.data.tags.get("final") == "true"]
    assert len(final_run) == 1 and final_run[0].data.tags["source_trial"] == v2.tags["source_trial"]
    assert len(client.get_metric_history(final_run[0].info.run_id, "dice_mean")) >= 1
    assert [r for r in runs if r.data.tags.get("tune_trial_id") == v2.tags["source_trial"]]


def test_a_version_that_does_not_beat_the_champion_leaves_the_alias(cluster, registered, tmp_path):
    from mlflow import MlflowClient

    from raysegment.model.weights import checkpoint_from_weights, shipped_weights
    from raysegment.registry.champion import register_checkpoint

    client = MlflowClient(cluster["mlflow"])
    before = client.get_model_version_by_alias("raysegment-mobilenet_v2", "champion")
    ckpt = checkpoint_from_weights(shipped_weights("mobilenet_v2"), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["manifest_hash"] = before.tags["manifest_hash"]  # comparable: the same data
    (ckpt / "config.json").write_text(json.dumps(config))
    worse = float(before.tags["dice_mean"]) - 0.01
    reg = register_checkpoint(ckpt, metrics={"dice_rv": worse, "dice_myo": worse, "dice_lv": worse, "dice_mean": worse},
                              tracking_uri=cluster["mlflow"])
    assert not reg.champion and "does not beat" in reg.reason
    assert champion_version(cluster) == before.version


def test_champion_loads_through_pyfunc(cluster, registered, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(cluster["mlflow"])
    from raysegment.inference.predictor import Predictor

    model = mlflow.pyfunc.load_model("models:/raysegment-mobilenet_v2@champion", dst_path=str(tmp_path))
    image, _ = synthetic_volume(1, shape=(3, 60, 70))
    raw = (image * 900).astype(np.float32)
    mask = model.predict(raw)
    assert mask.shape == (3, 60, 70) and mask.dtype == np.uint8
    # The registered pyfunc is the batch job's Predictor (in-plane "auto", as infer): the same mask,
    # with and without spacing, and as stored when told so.
    predictor = Predictor.load("models:/raysegment-mobilenet_v2@champion", tracking_uri=cluster["mlflow"])
    assert predictor.version == f"raysegment-mobilenet_v2/{champion_version(cluster)}"
    np.testing.assert_array_equal(mask, predictor.predict(raw, in_plane="auto"))
    spaced = model.predict(raw, params={"spacing_mm": [8.0, 0.7, 0.7]})
    np.testing.assert_array_equal(spaced, predictor.predict(raw, spacing=(8.0, 0.7, 0.7), in_plane="auto"))
    as_stored = model.predict(raw, params={"in_plane": "as-stored"})
    np.testing.assert_array_equal(as_stored, predictor.predict(raw))


def test_the_champion_serves_from_mlflows_own_scoring_server(cluster, registered, tmp_path):
    """`mlflow models serve -m models:/…@champion` (what an MLflow user tries first) answers a JSON
    volume with the Predictor's mask, and the version's requirements pin the stack it was made with."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request
    from importlib.metadata import version

    import mlflow
    from servers import free_port, wait_http

    from raysegment.inference.predictor import Predictor

    mlflow.set_tracking_uri(cluster["mlflow"])
    folder = mlflow.artifacts.download_artifacts("models:/raysegment-mobilenet_v2@champion", dst_path=str(tmp_path / "m"))
    pins = (Path(folder) / "requirements.txt").read_text().split()
    assert {f"torch=={version('torch').split('+')[0]}", f"torchvision=={version('torchvision').split('+')[0]}",
            f"raysegment=={version('raysegment')}"} <= set(pins), pins
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cluster["mlflow"]}  # how MLflow's CLI finds the registry
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/raysegment-mobilenet_v2@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=90)
        image, _ = synthetic_volume(1, shape=(3, 60, 70))
        raw = (image * 900).astype(np.float32)
        body = json.dumps({"inputs": raw.tolist(), "params": {"spacing_mm": [8.0, 0.7, 0.7]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        served = np.asarray(json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    predictor = Predictor.load("models:/raysegment-mobilenet_v2@champion", tracking_uri=cluster["mlflow"])
    np.testing.assert_array_equal(served, predictor.predict(raw, spacing=(8.0, 0.7, 0.7), in_plane="auto"))


def test_champion_stays_when_the_new_version_was_scored_on_another_manifest(cluster, registered, tmp_path):
    from mlflow import MlflowClient

    from raysegment.model.weights import checkpoint_from_weights, shipped_weights
    from raysegment.registry.champion import register_checkpoint

    before = champion_version(cluster)
    ckpt = checkpoint_from_weights(shipped_weights("mobilenet_v2"), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["manifest_hash"] = "0" * 64  # another data set: its Dice says nothing about this one
    (ckpt / "config.json").write_text(json.dumps(config))
    reg = register_checkpoint(ckpt, metrics={"dice_rv": 0.99, "dice_myo": 0.99, "dice_lv": 0.99, "dice_mean": 0.99},
                              tracking_uri=cluster["mlflow"])
    assert not reg.champion and "another data manifest" in reg.reason
    client = MlflowClient(cluster["mlflow"])
    assert champion_version(cluster) == before
    assert client.get_model_version("raysegment-mobilenet_v2", reg.version).tags["manifest_hash"] == "0" * 64


def test_a_local_ray_beside_another_one_is_the_cluster_its_processes_find(cluster):
    """With a second Ray on the machine (this module's Ray head), the processes of the Ray that
    ``ensure_ray`` starts still resolve "the" cluster to their own (Ray Train's placement-group
    cleaner does exactly this; when it could not, it died and each later Tune trial waited for
    ever), and this process's environment keeps no RAY_ADDRESS."""
    import os

    import ray

    from raysegment.runtime import ensure_ray

    try:
        ensure_ray(num_cpus=1)
        own = ray.get_runtime_context().gcs_address

        @ray.remote(num_cpus=0)
        def found() -> tuple[str, str | None]:
            from ray._private import services

            return services.canonicalize_bootstrap_address_or_die(None), os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

        address, watcher = ray.get(found.remote())
        assert own.rsplit(":", 1)[1] != cluster["gcs"].rsplit(":", 1)[1]
        assert address.rsplit(":", 1)[1] == own.rsplit(":", 1)[1]
        assert watcher == "0"  # a local Ray's Train runs without the preemption watcher (no spot nodes here)
        assert "RAY_ADDRESS" not in os.environ and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    finally:
        ray.shutdown()
