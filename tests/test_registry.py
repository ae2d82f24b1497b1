"""The registry's champion rule, without servers (the registry commands against a real MLflow
server are in test_serving.py)."""

from pathlib import Path

import pytest


def test_the_one_champion_rule_on_a_real_registry(tmp_path):
    """``should_promote`` on MLflow's own registry (a local SQLite store): the score is measured
    here, above its floor, strictly better, on the same data manifest — for segmenters and the
    diagnosis alike."""
    from mlflow import MlflowClient

    from raysegment.registry.champion import CHAMPION, MIN_CHAMPION_ACCURACY, should_promote

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    v1 = client.create_model_version("m", source=str(tmp_path))
    for k, v in {"dice_mean": "0.80", "manifest_hash": "abc"}.items():
        client.set_model_version_tag("m", v1.version, k, v)
    assert should_promote(client, "m", {"dice_mean": "0.05", "manifest_hash": "abc"})[0] is False  # below the floor
    assert should_promote(client, "m", {"dice_mean": "0.80", "manifest_hash": "abc"}) == (True, "no champion yet")
    client.set_registered_model_alias("m", CHAMPION, v1.version)
    assert should_promote(client, "m", {"dice_mean": "0.80", "manifest_hash": "abc"})[0] is False  # a tie stays
    assert should_promote(client, "m", {"dice_mean": "0.81", "manifest_hash": "abc"})[0] is True
    ok, reason = should_promote(client, "m", {"dice_mean": "0.90", "manifest_hash": "other"})
    assert not ok and "another data manifest" in reason
    assert should_promote(client, "m", {"dice_mean": "0.95", "manifest_hash": "abc", "evaluated": "false"})[0] is False
    # The diagnosis: the same rule on its cross-validated accuracy, chance (0.2) as the floor.
    assert should_promote(client, "d", {"cv_accuracy": "0.15"}, "cv_accuracy", MIN_CHAMPION_ACCURACY)[0] is False
    assert should_promote(client, "d", {"cv_accuracy": "nan"}, "cv_accuracy", MIN_CHAMPION_ACCURACY)[0] is False


def test_register_command_scores_a_checkpoint_and_applies_the_rule(tmp_path, tiny_model, sample_shards, capsys):
    """``registry register`` on a local MLflow store: the checkpoint is scored on the val split of
    --data, tagged, and (a random tiny model below the Dice floor) not made champion."""
    import warnings

    from conftest import write_checkpoint
    from mlflow import MlflowClient

    from raysegment.cli import registry as registry_cli

    model, config = tiny_model
    ckpt = write_checkpoint(tmp_path / "ckpt", model, config)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry_cli.main(["register", str(ckpt), "--data", str(sample_shards), "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "registered raysegment-mobilenet_v2 v1; champion: False" in out and "sanity check" in out
    assert not [w for w in caught if "input example was not provided" in str(w.message)], "MLflow's reminder in the log"
    tags = MlflowClient(uri).get_model_version("raysegment-mobilenet_v2", "1").tags
    assert tags.get("evaluated") != "false" and float(tags["dice_mean"]) < 0.1 and tags["manifest_hash"]
    # What someone browsing the registry reads on the version's page: its scores and why it is not champion.
    text = MlflowClient(uri).get_model_version("raysegment-mobilenet_v2", "1").description
    assert text.startswith(f"val Dice RV {float(tags['dice_rv']):.3f} / MYO ") and tags["manifest_hash"][:12] in text, text
    why = f"fails the sanity check: dice_mean {float(tags['dice_mean']):.4f} < 0.1"
    assert text.endswith(f"; not made champion when registered: {why}."), text
    # The same checkpoint scored on the same shards again: nothing registered twice.
    assert registry_cli.main(["register", str(ckpt), "--data", str(sample_shards), "--mlflow-uri", uri]) == 0
    assert capsys.readouterr().out.strip() == ("already registered: raysegment-mobilenet_v2 v1; champion: False "
                                               "(these weights, scored the same way, are this version)")
    assert [str(v.version) for v in MlflowClient(uri).search_model_versions("name='raysegment-mobilenet_v2'")] == ["1"]


def test_a_registered_version_shows_its_masks_on_a_val_patient_in_its_run(tmp_path, sample_shards, capsys):
    """Someone browsing the registry sees what a version segments, not only its Dice: the version's
    run has ``figures/`` with the model's outlines (RV red, MYO green, LV blue) on the first val
    patient of the data it was scored on, ED and ES, and the learning curves of the run that made it."""
    import mlflow
    from matplotlib.image import imread
    from mlflow import MlflowClient

    from raysegment.cli import registry as registry_cli
    from raysegment.data.prepare import load_manifest
    from raysegment.model.weights import shipped_weights
    from raysegment.reporting.report import COLOURS, model_history

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    weights = str(shipped_weights("mobilenet_v2"))
    assert registry_cli.main(["import", weights, "--data", str(sample_shards), "--mlflow-uri", uri]) == 0
    run_id = MlflowClient(uri).get_model_version("raysegment-mobilenet_v2", "1").run_id
    first = load_manifest(sample_shards)["splits"]["val"][0]
    assert sorted(a.path for a in MlflowClient(uri).list_artifacts(run_id, "figures")) == [
        f"figures/val_{first}_ED.png", f"figures/val_{first}_ES.png"]
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="figures", dst_path=str(tmp_path / "dl"),
                                                      tracking_uri=uri))
    pixels = (imread(folder / f"val_{first}_ES.png")[..., :3] * 255).round().astype(int)
    for colour in COLOURS.values():  # each structure outlined
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        assert (pixels == rgb).all(-1).sum() > 20, colour
    # The file's training history as the run's metrics: MLflow draws its learning curves.
    history = model_history(weights)
    curve = sorted(MlflowClient(uri).get_metric_history(run_id, "dice_mean"), key=lambda m: m.step)
    assert [m.step for m in curve] == [h["epoch"] + 1 for h in history] and len(curve) == 290
    assert curve[-1].value == pytest.approx(history[-1]["dice_mean"])


def test_a_search_shows_its_trials_curves_and_parameters_in_its_parent_run(tmp_path, monkeypatch, capsys):
    """``figures/search.png`` of a search's parent run: each trial's val Dice per epoch, read from its
    child run (a resumed trial's epoch logged twice counts once; the final run is no trial), and one
    panel per searched parameter that varied (here lr and w_rv, not decoder_width)."""
    import mlflow
    from matplotlib.image import imread
    from mlflow import MlflowClient

    import raysegment.reporting.search as search
    from raysegment.registry.figures import log_search_figure
    from raysegment.training.trials import SEARCHED

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("raysegment-tune")
    parent = client.create_run(exp).info.run_id
    logged = {"a": [(1, 0.5), (2, 0.7), (3, 0.8), (4, 0.82)], "b": [(1, 0.3)], "c": [(1, 0.4), (2, 0.5), (2, 0.6)]}
    for trial, points in logged.items():
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "tune_trial_id": trial}).info.run_id
        for step, value in points:
            client.log_metric(run, "dice_mean", value, step=step)
    final = client.create_run(exp, tags={"mlflow.parentRunId": parent, "final": "true"}).info.run_id
    client.log_metric(final, "dice_mean", 0.9, step=1)
    table = [{"trial_id": "a", "lr": 1e-3, "w_rv": 1.2, "decoder_width": 16, "dice_mean": 0.82},
             {"trial_id": "c", "lr": 3e-3, "w_rv": 0.8, "decoder_width": 16, "dice_mean": 0.6},
             {"trial_id": "b", "lr": 5e-4, "w_rv": 1.9, "decoder_width": 16, "dice_mean": 0.3}]
    drawn = {}

    def recording(trials, curves, params, out):
        drawn.update(curves=curves, panels=search.varied(trials, params))
        return real(trials, curves, params, out)

    real = search.search_figure
    monkeypatch.setattr(search, "search_figure", recording)
    log_search_figure(client, exp, parent, table, SEARCHED)
    assert drawn["curves"] == {"a": logged["a"], "b": logged["b"], "c": [(1, 0.4), (2, 0.6)]}
    assert drawn["panels"] == ["w_rv", "lr"]
    png = Path(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="figures/search.png",
                                                   dst_path=str(tmp_path / "dl"), tracking_uri=client.tracking_uri))
    pixels = (imread(png)[..., :3] * 255).round().astype(int)
    assert pixels.shape[1] == round((4.6 + 2 * 2.6) * 90)  # the curves and two parameter panels
    assert (pixels == [0x43, 0x63, 0xD8]).all(-1).sum() > 20  # the other trials' curves and points
    assert "search figure" not in capsys.readouterr().err

    class Down:  # a tracking server gone: the search keeps its result, one line says the picture is missing
        def search_runs(self, *a, **k):
            raise ConnectionError("no answer")

    log_search_figure(Down(), exp, parent, table, SEARCHED)
    assert capsys.readouterr().err == "[raysegment] search figure not drawn (ConnectionError: no answer)\n"


def test_an_ensemble_registered_again_with_the_same_members_makes_no_new_version(tmp_path, tiny_model, sample_shards,
                                                                                  capsys):
    """``registry ensemble`` re-run (a cron job, a user who is not sure it ran) with the same member
    versions on the same data: the version it made, not a copy; other members make a new one."""
    import copy

    import torch
    from conftest import write_checkpoint
    from mlflow import MlflowClient

    from raysegment.cli import registry as registry_cli

    model, config = tiny_model
    other = copy.deepcopy(model)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01)
    a, b = write_checkpoint(tmp_path / "a", model, config), write_checkpoint(tmp_path / "b", other, config)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def register(*members) -> str:
        argv = ["ensemble", *[x for m in members for x in ("--member", str(m))], "--data", str(sample_shards), "--mlflow-uri", uri]
        assert registry_cli.main(argv) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]

    assert register(a, b).startswith("registered raysegment-ensemble v1; ")
    assert register(a, b).startswith("already registered: raysegment-ensemble v1; ")
    assert register(a, a).startswith("registered raysegment-ensemble v2; ")
    assert [str(v.version) for v in MlflowClient(uri).search_model_versions("name='raysegment-ensemble'")] == ["2", "1"]
    run_id = MlflowClient(uri).get_model_version("raysegment-ensemble", "1").run_id  # the ensemble's own masks, drawn
    assert len(MlflowClient(uri).list_artifacts(run_id, "figures")) == 2


@pytest.mark.slow  # a command's own process: 10 s, no servers
def test_the_registry_command_prints_no_mlflow_info_lines_or_download_bars(tmp_path, tiny_model):
    """As a user runs it (MLflow loads in the command's own process): our line only. MLflow's own
    two registration lines (printed to its event stream, not logged) said the same before it."""
    import subprocess
    import sys

    import torch
    from conftest import write_checkpoint

    from raysegment.model.unet import build_model

    _, config = tiny_model
    torch.manual_seed(1)
    claim = {"epoch": 1, "metrics": {"dice_rv": 0.5, "dice_myo": 0.5, "dice_lv": 0.5, "dice_mean": 0.5}}  # unscored: quicker
    ckpt = write_checkpoint(tmp_path / "ckpt", build_model(config.model).eval(), config, claim)
    run = subprocess.run([sys.executable, "-m", "raysegment.registry", "register", str(ckpt),
                          "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].startswith("registered raysegment-mobilenet_v2 v1; champion: False")
    noise = [line for line in (run.stdout + run.stderr).splitlines()
             if " INFO " in line or "Downloading artifacts" in line or "Warning" in line
             or "Successfully registered model" in line or "Created version" in line]
    assert not noise, noise


def test_registry_refuses_missing_shards_before_anything(tmp_path, capsys):
    from raysegment.cli import registry as registry_cli

    with pytest.raises(SystemExit) as exit_:
        registry_cli.main(["import", "raysegment/shipped/mobilenet_v2.safetensors", "--data", str(tmp_path / "none"),
                           "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert exit_.value.code == 2 and "no shards there" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_list_shows_each_version_and_promote_moves_the_champion_by_hand(tmp_path, capsys):
    """``registry list`` and ``registry promote`` on MLflow's own registry (a local SQLite store): the
    versions with their scores and origin, newest first; a rollback moves ``@champion`` and writes when,
    from which version and why on the version (tag and description); wrong names and versions are
    one line each, and nothing moves."""
    from mlflow import MlflowClient

    from raysegment.cli import registry as registry_cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, name = MlflowClient(uri), "raysegment-mobilenet_v2"
    client.create_registered_model(name)
    for dice, origin in ((0.90, {"source_trial": "ab12cd34", "search_run": "0123456789ab", "epoch": "14"}),
                         (0.92, {"final": "true", "search_run": "0123456789ab", "source_trial": "ab12cd34"})):
        v = client.create_model_version(name, source=str(tmp_path))
        for k, value in {**{f"dice_{c}": str(dice) for c in ("rv", "myo", "lv", "mean")}, "manifest_hash": "ff302dc7f8ea00",
                         **origin}.items():
            client.set_model_version_tag(name, v.version, k, value)
        client.update_model_version(name, v.version, description=f"val Dice … made champion when registered: v{v.version}.")
    client.set_registered_model_alias(name, "champion", "2")

    assert registry_cli.main(["list", "--mlflow-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == name and len(lines) == 3, lines
    assert lines[1].split()[:2] == ["v2", "champion"] and lines[2].split()[0] == "v1" and "champion" not in lines[2]
    assert "val Dice 0.920 / 0.920 / 0.920, mean 0.920 on data ff302dc7f8ea  final run of search 01234567" in lines[1]
    assert lines[2].endswith("search 01234567, trial ab12cd34, epoch 14")

    for argv, says in ((["promote", name, "3"], f"error: {name} has no version 3 (it has v1, v2)"),
                       (["promote", "raysegment-densenet121", "1"],
                        f"error: no registered model 'raysegment-densenet121' (this registry has {name})")):
        assert registry_cli.main([*argv, "--reason", "x", "--mlflow-uri", uri]) == 2
        assert capsys.readouterr().err.strip() == says
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"

    assert registry_cli.main(["promote", name, "v1", "--reason", "v2 misses basal RV slices.", "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{name}@champion is v1 (by hand on ") and out.endswith(", replacing v2: v2 misses basal RV slices)")
    v1 = client.get_model_version_by_alias(name, "champion")
    assert str(v1.version) == "1" and v1.tags["promoted_by_hand"].endswith(" UTC, replacing v2: v2 misses basal RV slices")
    assert v1.description == (f"val Dice … made champion when registered: v1. Made champion by hand on "
                              f"{v1.tags['promoted_by_hand']}.")
    assert registry_cli.main(["promote", f"models:/{name}/1", "--reason", "again", "--mlflow-uri", uri]) == 0
    assert capsys.readouterr().out.strip() == f"{name}@champion is v1: it is the champion already"
    with pytest.raises(SystemExit):  # no version at all
        registry_cli.main(["promote", name, "--reason", "again", "--mlflow-uri", uri])
    assert capsys.readouterr().err.strip().endswith(f"registry promote {name}: which version? Give NAME VERSION or "
                                                    "NAME/VERSION (a number)")
    assert registry_cli.main(["list", name, "--mlflow-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:2] == ["v1", "champion"] and lines[2].endswith(f"made champion by hand: {v1.tags['promoted_by_hand']}")
    client.create_model_version(name, source=str(tmp_path))  # v3: newer than the champion
    assert registry_cli.main(["list", name, "--last", "1", "--mlflow-uri", uri]) == 0  # the newest, and the champion
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["v3", "v1"], lines
    assert lines[3] == "  … 1 older version(s) not shown (--last 1)" and len(lines) == 4, lines
    with pytest.raises(SystemExit):  # refused before the registry is asked
        registry_cli.main(["list", name, "--last", "0", "--mlflow-uri", "http://127.0.0.1:9"])
    assert capsys.readouterr().err.strip().endswith("error: --last must be ≥ 1, got 0")
    # Every raysegment model without a NAME: the diagnosis classifier's row says what it was scored on.
    client.create_registered_model("raysegment-diagnosis")
    d = client.create_model_version("raysegment-diagnosis", source=str(tmp_path))
    for k, value in {"cv_accuracy": "0.9531", "patients": "80", "segmenter": "shipped densenet121"}.items():
        client.set_model_version_tag("raysegment-diagnosis", d.version, k, value)
    assert registry_cli.main(["list", "--mlflow-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "raysegment-diagnosis" and lines[2] == name and len(lines) == 6, lines
    assert lines[1].endswith("CV accuracy 0.953 on 80 patients  registry diagnosis; its masks: shipped densenet121")
