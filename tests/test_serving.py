"""Serving with real processes (tests/servers.py): the registry's import and tamper checks, a
scheduled batch-inference job, a killed one that resumes exactly once, and ensembles — on a
champion imported from the shipped weights (scored on the sample), so this module needs no search
and runs beside tests/test_integration.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from servers import submit
from synth import make_nifti_patient, synthetic_volume

from raysegment.runtime import OWN_PROCESS_GROUP

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registered(cluster, sample_shards):
    """raysegment-mobilenet_v2 v1 = the shipped MobileNetV2, made champion by the operator's override
    (its Dice is the file's claim here; scoring is the import test's subject)."""
    from raysegment.cli import registry as registry_cli
    from raysegment.model.weights import shipped_weights

    assert registry_cli.main(["import", str(shipped_weights("mobilenet_v2")), "--force-champion",
                          "--mlflow-uri", cluster["mlflow"]]) == 0


def test_registry_import_scores_the_file_here_and_never_promotes_a_claim(cluster, sample_shards, tmp_path):
    """A file can claim any Dice: garbage weights claiming .99 are registered but never champion
    (unscored: tagged evaluated=false; scored on --data: below the sanity floor); the shipped file,
    scored on the sample's val split, becomes champion with the Dice measured here."""
    import torch
    from conftest import write_checkpoint
    from mlflow import MlflowClient

    from raysegment.analysis.metrics import dice_summary
    from raysegment.cli import registry as registry_cli
    from raysegment.config import ModelConfig, TrainConfig
    from raysegment.inference.evaluation import evaluate
    from raysegment.model.unet import build_model
    from raysegment.model.weights import export_weights, saved_config, shipped_weights

    torch.manual_seed(3)
    config = TrainConfig(data="x", model=ModelConfig(backbone="densenet121", decoder_width=8), image_size=64)
    claim = {"epoch": 9, "metrics": {"dice_rv": 0.99, "dice_myo": 0.99, "dice_lv": 0.99, "dice_mean": 0.99}}
    garbage = export_weights(write_checkpoint(tmp_path / "g", build_model(config.model).eval(), config, claim),
                             tmp_path / "garbage.safetensors")
    client = MlflowClient(cluster["mlflow"])
    assert registry_cli.main(["import", str(garbage), "--mlflow-uri", cluster["mlflow"]]) == 0
    assert registry_cli.main(["import", str(garbage), "--data", str(sample_shards), "--mlflow-uri", cluster["mlflow"]]) == 0
    unscored, scored = (client.get_model_version("raysegment-densenet121", v) for v in ("1", "2"))
    assert unscored.tags["evaluated"] == "false" and float(scored.tags["dice_mean"]) < 0.1
    assert not client.get_registered_model("raysegment-densenet121").aliases  # neither moved the alias

    path = shipped_weights("densenet121")
    assert registry_cli.main(["import", str(path), "--data", str(sample_shards), "--mlflow-uri", cluster["mlflow"]]) == 0
    champion = client.get_model_version_by_alias("raysegment-densenet121", "champion")
    expected = dice_summary(evaluate(str(path), sample_shards, splits=("val",)))
    assert champion.version == "3" and float(champion.tags["dice_mean"]) == pytest.approx(expected["dice_mean"], abs=1e-6)
    from dataclasses import asdict

    assert json.loads(champion.tags["config"])["model"] == asdict(saved_config(path).model)  # the file's own
    assert "evaluated" not in champion.tags
    # The version's weights digest is checked on every load: replaced weights in the artifact store
    # (another valid state dict) are refused.
    from raysegment.inference.predictor import Predictor
    from raysegment.model.checkpoint import DamagedWeights, state_digest

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


@pytest.fixture(scope="module")
def diagnosis_registered(cluster):
    """raysegment-diagnosis v1 = the shipped classifier (JSON), registered through the CLI."""
    import raysegment
    from raysegment.cli import registry as registry_cli
    from raysegment.registry import champion as registry

    shipped = Path(raysegment.__file__).with_name("shipped") / "diagnosis.json"
    assert registry_cli.main(["diagnosis", "shipped", "--mlflow-uri", cluster["mlflow"]]) == 0
    return shipped, registry.Registration("raysegment-diagnosis", "1", True, "")


def test_diagnosis_model_is_registered_with_its_accuracy_and_serves_the_same_probabilities(cluster, diagnosis_registered,
                                                                                              tmp_path):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from raysegment.analysis.diagnosis import FEATURES, load

    shipped, _ = diagnosis_registered
    model = load(shipped)
    client = MlflowClient(cluster["mlflow"])
    assert client.get_model_version_by_alias("raysegment-diagnosis", "champion").version == "1"
    tags = client.get_model_version("raysegment-diagnosis", "1").tags
    assert float(tags["cv_accuracy"]) == pytest.approx(model.meta["accuracy"], abs=1e-4) and tags["segmenter"]
    mlflow.set_tracking_uri(cluster["mlflow"])
    served = mlflow.pyfunc.load_model("models:/raysegment-diagnosis@champion", dst_path=str(tmp_path))
    x = np.array([model.fill, np.array(model.fill) * 1.3])
    out = served.predict(pd.DataFrame(x, columns=list(FEATURES)))
    np.testing.assert_allclose(out[[f"p_{c}" for c in model.classes]].to_numpy(), model.predict_proba(x), atol=1e-9)
    assert list(out["group"]) == model.predict(x)
    from_registry = load("models:/raysegment-diagnosis@champion", cluster["mlflow"])
    np.testing.assert_array_equal(from_registry.predict_proba(x), model.predict_proba(x))


def test_scheduled_inference_job(cluster, registered, diagnosis_registered, tmp_path):
    import pyarrow.parquet as pq

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _studies(inp)
    args = ["raysegment.infer", "--model", "models:/raysegment-mobilenet_v2@champion", "--input", str(inp),
            "--output", str(out), "--mlflow-uri", cluster["mlflow"], "--threads", "1", "--actors", "1",
            "--diagnosis", "models:/raysegment-diagnosis@champion"]
    log = submit(cluster, *args)
    assert "6 to segment" in log  # frame01, frame05, _4d of patient007, corrupt, zero, cine_4d
    assert "Dice against the reference masks (2 frames): RV " in log  # patient007's two frame files have a _gt beside them
    assert json.loads((out / "last_run.json").read_text())["dice_vs_gt"]["volumes"] == 2
    # The same means in the console and in report.md (the console's were rounded twice: RV 0.909 against 0.910)
    said = re.search(r"\(2 frames\): RV ([\d.]+), MYO ([\d.]+), LV ([\d.]+), mean (\d\.\d+)", log).groups()
    written = re.search(r"RV ([\d.]+), MYO ([\d.]+), LV ([\d.]+) \(mean ([\d.]+)\)", (out / "report.md").read_text())
    assert said == written.groups(), (said, written)
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
    if ed["volume_lv_ml"] > 0:  # ED and ES of patient007 both segmented: EF from their LV volumes, basal excess off
        expected = 100 * (ed["volume_lv_ml"] - (es["volume_lv_ml"] - es.get("lv_es_basal_excess_ml", 0.0))) / ed["volume_lv_ml"]
        assert ed["ef_lv_pct"] == pytest.approx(expected, abs=0.01) and es["ef_lv_pct"] == pytest.approx(expected, abs=0.01)
        assert ed["diagnosis"] in ("NOR", "MINF", "DCM", "HCM", "RV") and ed["diagnosis"] == es["diagnosis"]
        assert "## Patients (ED + ES)" in (out / "report.md").read_text()
        # The registered pyfunc, given results.csv's ED rows (patient indices), diagnoses as the job did.
        import mlflow
        import pandas as pd

        mlflow.set_tracking_uri(cluster["mlflow"])
        table = pd.read_csv(out / "results.csv").query("phase == 'ED'").reset_index(drop=True)
        again = mlflow.pyfunc.load_model("models:/raysegment-diagnosis@champion").predict(table)
        assert again["group"][list(table["study"]).index(ed["study"])] == ed["diagnosis"]
    assert len([r for r in done if r["study"].endswith("cine_4d.nii.gz")]) == 3  # every frame
    assert (out / "report.md").read_text().count("![") >= 4

    # The next scheduled run (what is done is skipped, a new study is picked up) runs in-process in
    # tests/test_infer.py::test_batch_job_faults_bad_neighbours_and_reruns; a poll with nothing new in
    # test_a_pacs_is_source_and_sink_exactly_once.


def test_killed_inference_resumes_exactly_once(cluster, registered, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _studies(inp, n_extra=6)
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    cmd = [sys.executable, "-m", "raysegment.infer", "--model", "models:/raysegment-mobilenet_v2@champion",
           "--input", str(inp), "--output", str(out), "--mlflow-uri", cluster["mlflow"], "--threads", "1", "--actors", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **OWN_PROCESS_GROUP)
    ledger = out / "ledger.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and (not ledger.exists() or len(ledger.read_text().splitlines()) < 3):
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = len(ledger.read_text().splitlines())
    assert 3 <= first < 12
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    paths = [e["path"] for e in entries]
    assert len(paths) == len(set(paths)) == 12  # every study once, none lost
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert len(masks) == 10 and not [m for m in masks if m.startswith(".partial")]
    import pyarrow.parquet as pq

    studies = {r["study"] for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert len(studies) == 12


def test_ensemble_version_averages_its_members_everywhere(cluster, registered, sample_shards, tmp_path, capsys):
    """registry ensemble of a registered MobileNetV2 and the 2.5-D DenseNet-121 file: members pinned,
    its own val Dice, and the pyfunc and Predictor.load (of the references, or the ensemble's URI)
    give the same masks. (The batch job's ensemble: tests/test_infer.py.)"""
    import mlflow
    from mlflow import MlflowClient

    from raysegment.analysis.metrics import dice_summary
    from raysegment.cli import registry as registry_cli
    from raysegment.inference.evaluation import evaluate
    from raysegment.inference.predictor import Predictor
    from raysegment.model.weights import shipped_weights

    files = ["models:/raysegment-mobilenet_v2/1", str(shipped_weights("densenet121"))]  # 2-D + 2.5-D members
    assert registry_cli.main(["ensemble", "--member", "models:/raysegment-mobilenet_v2@champion", "--member", files[1],
                          "--data", str(sample_shards), "--mlflow-uri", cluster["mlflow"]]) == 0
    client = MlflowClient(cluster["mlflow"])
    v = client.get_model_version_by_alias("raysegment-ensemble", "champion")
    assert json.loads(v.tags["members"])[0] == "raysegment-mobilenet_v2/1" and v.tags["flip_tta"] == "false"
    expected = dice_summary(evaluate(files, sample_shards, splits=("val",), tracking_uri=cluster["mlflow"]))
    assert float(v.tags["dice_mean"]) == pytest.approx(expected["dice_mean"], abs=1e-6)
    capsys.readouterr()
    assert registry_cli.main(["list", "raysegment-ensemble", "--mlflow-uri", cluster["mlflow"]]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:2] == [f"v{v.version}", "champion"] and row[row.index("of") + 1] == "raysegment-mobilenet_v2/1,", row

    image, _ = synthetic_volume(2, shape=(3, 60, 70))
    raw = (image * 700).astype(np.float32)
    direct = Predictor.load(files, tracking_uri=cluster["mlflow"])
    registered_ensemble = Predictor.load("models:/raysegment-ensemble@champion", tracking_uri=cluster["mlflow"])
    assert len(registered_ensemble.members) == 2 and registered_ensemble.version == f"raysegment-ensemble/{v.version}"
    np.testing.assert_array_equal(registered_ensemble.predict(raw), direct.predict(raw))
    mlflow.set_tracking_uri(cluster["mlflow"])
    pyfunc = mlflow.pyfunc.load_model("models:/raysegment-ensemble@champion", dst_path=str(tmp_path))
    np.testing.assert_array_equal(pyfunc.predict(raw), direct.predict(raw, in_plane="auto"))  # infer's default


def test_a_pacs_is_source_and_sink_exactly_once(cluster, tmp_path, capsys):
    """DICOM cine series in a real Orthanc (sample patients, oblique geometry, plus a secondary
    capture and a series missing a slice): the job finds them by QIDO-RS, retrieves them (WADO-RS),
    stores one SEG per cine frame back (STOW-RS) whose masks placed by their frame positions equal
    the NIfTI masks, with the Dice of the NIfTI path; a rerun stores nothing new; storing them again
    (as a run killed before its ledger line does) keeps the same instances, no duplicates."""
    import highdicom as hd
    import pyarrow.parquet as pq
    import pydicom
    from servers import orthanc_available, running_orthanc
    from synth import sample_cine, write_dicom_cine

    from raysegment.analysis.metrics import dice
    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.io import dicom, dicomweb
    from raysegment.io import seg as dicom_seg

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    with running_orthanc(tmp_path / "orthanc") as url:
        client = dicomweb.web_client(url)
        truth, sources = {}, {}
        for n, patient in enumerate(("patient063", "patient078")):
            images, labels, spacing = sample_cine(patient)
            files = write_dicom_cine(tmp_path / "src" / patient, images, spacing_zyx=spacing, patient=patient,
                                     origin=(-90.0 + 7 * n, -70.0, 30.0))
            series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
            truth[series_uid] = (images, labels, spacing)
            sources[series_uid] = sorted(files)
            client.store_instances([pydicom.dcmread(f) for f in files])
        images = next(iter(truth.values()))[0]
        odd = write_dicom_cine(tmp_path / "src" / "sc", images[:, :3], modality="OT", patient="X1")
        gap = write_dicom_cine(tmp_path / "src" / "gap", images, patient="X2", skip={(0, 3), (1, 3)})
        client.store_instances([pydicom.dcmread(f) for f in odd + gap])

        out = tmp_path / "out"
        args = ["raysegment.infer", "--model", "shipped:mobilenet_v2", "--input", url, "--output", str(out),
                "--threads", "1", "--actors", "1"]
        log = submit(cluster, *args)
        assert "3 studies, 0 already done" in log  # the secondary capture is no MR series: not even listed
        rows = pq.read_table(out / "results.parquet").to_pylist()
        skipped = [r for r in rows if r["status"] == "skipped"]
        assert len(skipped) == 1 and "not evenly spaced" in skipped[0]["reason"]
        done = [r for r in rows if r["status"] == "done"]
        assert len(done) == 4 and all(r["stored"] for r in done)  # 2 series × 2 frames
        assert not any((out / "dicom-in").iterdir())  # the retrieved images: the PACS keeps them, not the output
        segs = client.search_for_instances(search_filters={"Modality": "SEG"})
        assert len(segs) == 4
        # Each cine series' clinical indices as an SR in the PACS beside its SEGs: results.csv's values.
        from raysegment.io.sr import MEASUREMENTS, read_indices_sr

        srs = client.search_for_instances(search_filters={"Modality": "SR"})
        assert len(srs) == 2 and json.loads((out / "last_run.json").read_text())["srs_stored"] == 2
        for r in (r for r in done if r["phase"] == "ED"):
            series_uid = r["study"].split("/")[1]
            sr = next(i for i in srs if i["0020000E"]["Value"][0] != series_uid and i["0020000D"]["Value"][0] in r["study"])
            stored = client.retrieve_instance(study_instance_uid=sr["0020000D"]["Value"][0],
                                              series_instance_uid=sr["0020000E"]["Value"][0],
                                              sop_instance_uid=sr["00080018"]["Value"][0])
            stored.save_as(tmp_path / "sr.dcm")
            assert read_indices_sr(tmp_path / "sr.dcm") == {k: round(r[k], 1) for k, *_ in MEASUREMENTS}
            assert 40 < r["lv_ef_pct"] < 80 and r["lv_edv_ml"] > 50  # a real patient's, not a placeholder
        # The PACS lists a SEG series per cine series, by the model version that made it.
        listed = client.search_for_series(search_filters={"Modality": "SEG"},
                                          fields=["SeriesDescription", "SeriesNumber"])
        assert sorted((s["0008103E"]["Value"][0], s["00200011"]["Value"][0]) for s in listed) == [
            (f"raysegment {done[0]['model_version']}", 9000)] * 2
        for r in done:
            series_uid = r["study"].split("/")[1]
            seg = hd.seg.segread(r["seg"])
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
            source = dicom.Series(series_uid, r["study"].split("/")[0][len("dicom:"):], sources[series_uid])
            cine = dicom.read_cine(source)
            # The copy in the PACS: retrieved, read by highdicom, placed by its frame positions.
            stored = client.retrieve_instance(study_instance_uid=seg.StudyInstanceUID, series_instance_uid=seg.SeriesInstanceUID,
                                              sop_instance_uid=seg.SOPInstanceUID)
            stored.save_as(tmp_path / "stored.dcm")
            placed = dicom_seg.read_seg_labels(tmp_path / "stored.dcm", cine, r["frame"])
            nifti = np.transpose(np.asarray(nib.load(r["mask"]).dataobj), (3, 2, 1, 0))[r["frame"]]
            np.testing.assert_array_equal(placed, nifti)
        # As good as the NIfTI path: the same model on the same patient's arrays with its spacing.
        predictor = Predictor.load("shipped:mobilenet_v2", PredictConfig())
        for series_uid, (images, labels, spacing) in truth.items():
            row = next(r for r in done if r["study"].endswith("/" + series_uid))
            mask = np.transpose(np.asarray(nib.load(row["mask"]).dataobj), (3, 2, 1, 0))
            for t in range(2):
                via_dicom = np.mean([dice(mask[t] == c, labels[t] == c) for c in (1, 2, 3)])
                via_arrays = np.mean([dice(predictor.predict(images[t], spacing=spacing) == c, labels[t] == c)
                                      for c in (1, 2, 3)])
                assert via_dicom > 0.7 and via_dicom >= via_arrays - 0.01, (series_uid, t, via_dicom, via_arrays)

        # The next scheduled run finds nothing new, stores nothing and starts no Ray work (so it runs
        # here in-process: with nothing to segment it never connects to a cluster).
        from raysegment.cli import infer

        assert infer.main(args[1:]) == 0
        text = capsys.readouterr().out
        assert "3 studies, 3 already done" in text and "0 to segment" in text
        assert json.loads((out / "last_run.json").read_text())["actors"] == 0
        assert len(client.search_for_instances(search_filters={"Modality": "SEG"})) == 4
        assert len(client.search_for_instances(search_filters={"Modality": "SR"})) == 2
        assert json.loads((out / "last_run.json").read_text())["srs_stored"] == 0
        # A run killed after STOW-RS but before its ledger line stores the same SEGs again on resuming:
        # the same instances (UIDs from series, frame and model), not duplicates.
        dicomweb.web_store(client, [Path(r["seg"]) for r in done])
        assert len(client.search_for_instances(search_filters={"Modality": "SEG"})) == 4
