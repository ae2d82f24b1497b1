"""The path held-out patients are scored on — the official ACDC layout (int16 NIfTI, spacing in the
header, ``Info.cfg`` without its ``Group:`` line) through the batch job's study code — measures what
``report evaluate`` and ``report clinical`` measure on the shards: same masks, Dice, EFs, diagnosis.

Real data: the bundled sample's two val patients (028 HCM, 078 NOR) and the shipped MobileNetV2. Also
here: a 4-D NIfTI cine of one of them gets the same indices from its own ED and ES frames.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from raysegment.analysis.diagnosis import GROUPS, load, patient_features
from raysegment.analysis.levels import level_records
from raysegment.analysis.metrics import score_records
from raysegment.data.dataset import load_volumes
from raysegment.data.prepare import load_manifest
from raysegment.data.volumes import read_info_csv, write_official_patient
from raysegment.inference.ledger import add_patient_clinical
from raysegment.inference.predictor import Predictor, predicted_masks
from raysegment.inference.study import segment_study
from raysegment.io.studies import read_study, zyx_to_nifti
from raysegment.reporting.batch import batch_report
from raysegment.reporting.report import clinical_records

SAMPLE = Path(__file__).resolve().parents[1] / "raysegment" / "sample"


def _write_official(volumes, root: Path) -> list[Path]:
    """The volumes as the official release lays them out: raw-like int16 images, uint8 ``_gt``,
    ``Info.cfg`` with ED/ES frame numbers, height, weight and no group. Returns the image files."""
    info = read_info_csv(SAMPLE / "info.csv")
    studies = []
    for patient in sorted({v.patient for v in volumes}):
        # An affine map of the shard's intensities: the normalisation must undo it.
        studies += write_official_patient(root, [v for v in volumes if v.patient == patient], info[patient],
                                          scale=3000.0, offset=-40.0)
    return studies


def test_official_layout_through_the_batch_job_scores_as_the_shards(tmp_path, sample_shards):
    torch.set_num_threads(2)
    volumes = load_volumes(sample_shards, "val")
    patients = load_manifest(sample_shards)["patients"]
    assert sorted({v.patient for v in volumes}) == ["patient028", "patient078"] and len(volumes) == 4
    predictor, diagnosis = Predictor.load("shipped:mobilenet_v2"), load("shipped")
    masks = predicted_masks(predictor, volumes)
    records = {r["patient"]: r for r in clinical_records(volumes, masks, patients, diagnosis.basal_rv)}
    names, x, _ = patient_features(volumes, masks, patients, diagnosis.basal_rv)
    calls = dict(zip(names, diagnosis.predict(x)))

    rows = []
    for study in _write_official(volumes, tmp_path / "acdc"):
        rows += segment_study(study, predictor, "shipped:mobilenet_v2", tmp_path / "out")
    add_patient_clinical(rows, diagnosis)
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    for row in rows:
        patient = Path(row["study"]).parent.name
        v = next(v for v in volumes if (v.patient, v.phase) == (patient, row["phase"]))
        mask = read_study(Path(row["mask"]))[1][0]
        assert mask.shape == v.label.shape
        # int16 rounding may move a voxel or two, no more.
        assert (mask == masks[(patient, v.phase)]).mean() > 0.9995
        shards_dice = {r["class"]: r["dice"] for r in score_records(masks[(patient, v.phase)], v.label, distances=False)}
        for name in ("rv", "myo", "lv"):
            assert row[f"dice_{name}"] == pytest.approx(shards_dice[name], abs=2e-3), (patient, v.phase, name)
        for r in level_records(masks[(patient, v.phase)], v.label, v.spacing):  # as `report evaluate --by-level`
            assert row[f"dice_{r['class']}_{r['level']}"] == pytest.approx(r["dice"], abs=5e-3, nan_ok=True), r
        rec = records[patient]
        for index in ("lv_ef_pct", "rv_ef_pct", "lv_edv_ml", "rv_esv_ml", "lv_mass_g"):
            assert row[index] == pytest.approx(rec[f"pred_{index}"], rel=5e-3, abs=0.1), (patient, index)
        assert row["diagnosis"] == calls[patient] and row["diagnosis"] in GROUPS
        assert "group_reference" not in row  # the Info.cfg had no Group line
    # The sample's val patients are segmented well enough that the diagnosis is not a coin toss.
    assert {p: calls[p] for p in calls} == {"patient028": "HCM", "patient078": "NOR"}


def test_a_4d_nifti_cine_gets_its_patients_indices_and_diagnosis_unless_in_an_official_folder(tmp_path, sample_shards):
    import nibabel as nib

    torch.set_num_threads(2)
    volumes = [v for v in load_volumes(sample_shards, "val") if v.patient == "patient078"]
    ed, es = sorted(volumes, key=lambda v: v.phase)  # ED, ES
    predictor, diagnosis = Predictor.load("shipped:mobilenet_v2"), load("shipped")
    masks = predicted_masks(predictor, volumes)
    (record,) = clinical_records(volumes, masks, {}, diagnosis.basal_rv)
    # A cine as scanners export it: ES between two end-diastolic frames, int16, (x, y, z, t).
    cine = np.stack([np.round(v.image * 3000).astype(np.int16) for v in (ed, es, ed)])
    xyz = tuple(ed.spacing[::-1])
    img = nib.Nifti1Image(zyx_to_nifti(cine), np.diag(xyz + (1.0,)))
    img.header.set_zooms(xyz + (1.0,))
    for folder, official in ((tmp_path / "export", False), (tmp_path / "training" / "patient078", True)):
        folder.mkdir(parents=True)
        if official:
            (folder / "Info.cfg").write_text("ED: 1\nES: 9\nHeight: 185\nNbFrame: 30\nWeight: 84\n")
        nib.save(img, str(folder / "patient078_4d.nii.gz"))
        rows = segment_study(folder / "patient078_4d.nii.gz", predictor, "shipped", tmp_path / "out")
        add_patient_clinical(rows, diagnosis)
        if official:  # ED and ES are the frame files Info.cfg names; the 4-D file gets no second set
            assert [r["phase"] for r in rows] == ["", "", ""] and all("diagnosis" not in r for r in rows)
            continue
        assert [r["phase"] for r in rows[:2]] == ["ED", "ES"]  # largest / smallest LV (frames 0 and 2 tie: the first)
        for index in ("lv_ef_pct", "rv_ef_pct", "lv_edv_ml", "lv_mass_g"):
            assert rows[0][index] == pytest.approx(record[f"pred_{index}"], rel=5e-3, abs=0.1), index
        assert "lv_edv_ml_per_m2" not in rows[0] or np.isnan(rows[0]["lv_edv_ml_per_m2"])  # no height or weight here
        # The patient's diagnosis on its ED and ES rows (as for a DICOM cine), its EF on every frame's row.
        assert rows[0]["diagnosis"] == rows[1]["diagnosis"] in GROUPS and "diagnosis" not in rows[2]
        assert all((r["ef_lv_pct"], r["ef_rv_pct"]) == (rows[0]["lv_ef_pct"], rows[0]["rv_ef_pct"]) for r in rows)
        # report.md's Patients table names the cine by its file, not by the folder it lies in.
        md = batch_report(rows, tmp_path / "report", 0).read_text()
        assert f"| patient078_4d.nii.gz | {rows[0]['lv_edv_ml']:.1f} | {rows[0]['lv_ef_pct']:.1f} |" in md
