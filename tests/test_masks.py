"""Masks another tool wrote (nnU-Net, MONAI, infer) scored on shards as a model's are: `report evaluate
--masks`, `report compare` with a folder side, `report clinical --masks`; names, axes, refusals."""

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from synth import drop_info_lines, make_nifti_dataset

from raysegment.cli import report as report_cli
from raysegment.data.dataset import load_volumes, shard_splits
from raysegment.data.masks import _key, is_mask_folder, read_masks
from raysegment.data.prepare import PrepareConfig, prepare
from raysegment.inference.evaluation import evaluate_masks


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(official-layout source, its shards, the splits they hold) of 3 synthetic patients."""
    root = tmp_path_factory.mktemp("masks")
    src = make_nifti_dataset(root / "acdc", n=3)
    (root / "val.txt").write_text("patient003\n")
    prepare(PrepareConfig(source=src, out=root / "shards", val_file=root / "val.txt", progress=False))
    return src, root / "shards", shard_splits(root / "shards")


def _write_masks(src: Path, out: Path, name, change=None) -> Path:
    """Each frame's _gt as another tool's prediction: file name ``name(case)``, ``change(img)`` applied."""
    out.mkdir(parents=True, exist_ok=True)
    for gt in sorted(src.rglob("*_gt.nii.gz")):
        img = nib.load(gt)
        img = change(img) if change else img
        path = out / name(gt.name[: -len("_gt.nii.gz")])
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)
    return out


def _without_rv(img):
    data = np.asarray(img.dataobj).copy()
    data[data == 1] = 0
    return nib.Nifti1Image(data, img.affine)


def test_names_of_masks_other_tools_write():
    assert _key("patient101_frame01") == ("patient101", "frame01")  # nnU-Net's prediction
    assert _key("patient001_frame12_1a2b3c4d_seg") == ("patient001", "frame12")  # infer's
    assert _key("patient001_ED_pred") == ("patient001", "ED")
    assert _key("patient001_frame01_gt") is None  # the reference
    assert _key("patient001_frame01_0000") is None  # an nnU-Net image
    assert _key("patient001_4d") is None and _key("notes") is None


def test_masks_score_as_written_and_a_missing_structure_costs_its_dice(official, tmp_path):
    src, shards, splits = official
    exact = _write_masks(src, tmp_path / "nnunet", lambda case: f"{case}.nii.gz")
    records = evaluate_masks(exact, shards, splits)
    assert len({(r["patient"], r["phase"]) for r in records}) == 6
    assert all(r["dice"] == pytest.approx(1.0) for r in records)
    # MONAI-like: in subfolders, a suffix, RV dropped
    no_rv = _write_masks(src, tmp_path / "monai", lambda case: f"{case}/{case}_seg.nii.gz", _without_rv)
    assert is_mask_folder(no_rv) and not is_mask_folder(src / "training" / "patient001" / "nothing")
    dice = {r["class"]: r["dice"] for r in evaluate_masks(no_rv, shards, splits)}
    assert dice["rv"] == 0.0 and dice["myo"] == pytest.approx(1.0) and dice["lv"] == pytest.approx(1.0)


def test_without_frame_numbers_masks_named_by_phase_are_matched(official, tmp_path):
    """Shards whose volumes and manifest give no frame numbers (a bundle, remote shards): ``patientNNN_ED``."""
    src, shards, _ = official
    volumes = load_volumes(shards, "val")
    folder = _write_masks(src / "training" / "patient003", tmp_path / "by-phase",
                          lambda case: f"{case.split('_')[0]}_{'ED' if case.endswith('01') else 'ES'}_seg.nii.gz")
    masks = read_masks(folder, volumes)
    assert sorted(masks) == [("patient003", "ED"), ("patient003", "ES")]
    assert all(np.array_equal(masks[(v.patient, v.phase)], v.label) for v in volumes)


def test_masks_saved_in_other_axes_are_turned_to_the_source_frames(official, tmp_path):
    src, shards, splits = official

    def lps(img):
        return img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(("L", "P", "S"))))

    turned = _write_masks(src, tmp_path / "lps", lambda case: f"{case}_pred.nii.gz", lps)
    assert not np.array_equal(np.asarray(nib.load(next(turned.iterdir())).dataobj),
                              np.asarray(nib.load(next(src.rglob("patient001_frame01_gt.nii.gz"))).dataobj))
    assert all(r["dice"] == pytest.approx(1.0) for r in evaluate_masks(turned, shards, splits))


def test_report_commands_take_a_masks_folder(official, tmp_path, capsys):
    src, shards, splits = official
    exact = _write_masks(src, tmp_path / "a", lambda case: f"{case}.nii.gz")
    no_rv = _write_masks(src, tmp_path / "b", lambda case: f"{case}_seg.nii.gz", _without_rv)
    base = ["--data", str(shards), "--splits", *splits]
    assert report_cli.main(["evaluate", "--masks", str(exact), *base, "--out", str(tmp_path / "ev")]) == 0
    assert "| all | 1.000 | 1.000 | 1.000 | 1.000 |" in capsys.readouterr().out
    assert report_cli.main(["compare", "--a", str(exact), "--b", str(no_rv), *base, "--out", str(tmp_path / "cp")]) == 0
    out = capsys.readouterr().out
    assert "| RV | 1.000 | 0.000 | -1.000 |" in out and "| LV | 1.000 | 1.000 | +0.000 |" in out, out
    assert json.loads((tmp_path / "cp" / "compare.json").read_text())["b"] == str(no_rv)
    assert report_cli.main(["clinical", "--masks", str(exact), *base, "--out", str(tmp_path / "cl")]) == 0
    assert "Clinical indices of the masks in" in capsys.readouterr().out
    assert "| lv_ef_pct | 3 | 0.00 |" in (tmp_path / "cl" / "clinical.md").read_text()
    assert report_cli.main(["figures", "--model", f"nnunet={no_rv}", "--data", str(shards), "--out", str(tmp_path / "fi")]) == 0
    assert sorted(p.name for p in (tmp_path / "fi").iterdir()) == ["overlay_nnunet_patient003_ED.png",
                                                                   "overlay_nnunet_patient003_ES.png"]


def test_wrong_masks_are_one_error_line(official, tmp_path, capsys):
    src, shards, splits = official
    base = ["--data", str(shards), "--splits", *splits]
    assert report_cli.main(["evaluate", "--masks", str(src), *base]) == 2  # the images, not masks
    assert "not a label map" in capsys.readouterr().err
    some = _write_masks(src, tmp_path / "some", lambda case: f"{case}.nii.gz")
    next(some.glob("patient002_*")).unlink()
    assert report_cli.main(["evaluate", "--masks", str(some), *base]) == 2
    assert "no mask for 1 of " in capsys.readouterr().err
    small = _write_masks(src, tmp_path / "small", lambda case: f"{case}.nii.gz",
                         lambda img: nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine))
    assert report_cli.main(["evaluate", "--masks", str(small), *base]) == 2
    assert "masks must be on the original frame's grid" in capsys.readouterr().err
    onehot = _write_masks(src, tmp_path / "onehot", lambda case: f"{case}.nii.gz",
                          lambda img: nib.Nifti1Image(np.eye(4, dtype=np.float32)[np.asarray(img.dataobj)], img.affine))
    assert report_cli.main(["evaluate", "--masks", str(onehot), *base]) == 2
    assert "is 4-D (48, 40, 4, 4) (one channel per class? save the argmax)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        report_cli.main(["evaluate", "--masks", str(some), "--flip-tta", *base])
    assert stop.value.code == 2 and "--flip-tta: how a model predicts" in capsys.readouterr().err


def test_a_test_set_prepared_all_val_is_scored_by_default_and_trained_on_by_nothing(official, tmp_path, capsys):
    """``prepare --val-fraction 1`` puts every patient in val, which ``report evaluate`` (saying so)
    and ``report clinical`` score without ``--splits``; ``train`` refuses the shards in one line."""
    from raysegment.cli import prepare as prepare_cli
    from raysegment.cli import train as train_cli

    src, _, _ = official
    test = tmp_path / "test"
    assert prepare_cli.main(["--source", str(src), "--out", str(test), "--val-fraction", "1", "--no-progress"]) == 0
    assert shard_splits(test) == ["val"]
    masks = _write_masks(src, tmp_path / "preds", lambda case: f"{case}.nii.gz")
    capsys.readouterr()
    assert report_cli.main(["evaluate", "--masks", str(masks), "--data", str(test)]) == 0
    out, err = capsys.readouterr()
    assert "holds no train split (a test set, prepared with --val-fraction 1?): scoring its val split" in err
    assert "| val | all | 1.000 | 1.000 | 1.000 | 1.000 |" in out and "| train |" not in out
    assert report_cli.main(["clinical", "--masks", str(masks), "--data", str(test), "--out", str(tmp_path / "c")]) == 0
    assert "3 patients (val)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        train_cli.main(["--data", str(test), "--epochs", "1", "--storage", str(tmp_path / "runs")])
    assert stop.value.code == 2 and "holds no train patients (a test set" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_diagnosis_line_scores_only_patients_with_a_reference_group_and_withholds_as_the_batch_job(tmp_path, capsys):
    """``report clinical --diagnosis`` on a test set: a patient without ``Group:`` in Info.cfg (ACDC's
    101–150) is not counted wrong but listed by what it was called; one whose LV's ES exceeds its ED
    (ED and ES masks swapped) is withheld, as ``infer`` withholds it (it was called a group). Each
    patient's call goes in clinical.csv."""
    src = make_nifti_dataset(tmp_path / "acdc", n=3)
    drop_info_lines(src / "training" / "patient003", "Group")
    assert prepare(PrepareConfig(source=src, out=tmp_path / "test", val_fraction=1.0, progress=False))
    swap = {"patient002_frame01": "patient002_frame07", "patient002_frame07": "patient002_frame01"}
    masks = _write_masks(src, tmp_path / "preds", lambda case: f"{swap.get(case, case)}.nii.gz")
    assert report_cli.main(["clinical", "--masks", str(masks), "--data", str(tmp_path / "test"), "--diagnosis", "shipped",
                            "--out", str(tmp_path / "c")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Diagnosis"))
    assert re.fullmatch(r"Diagnosis \(shipped\): [01]/2 right \((wrong: patient001 DCM→\w+; )?withheld: patient002 "
                        r"es_above_ed_lv\); without a reference group \(1\): (NOR|MINF|DCM|HCM|RV) 1", line), line
    # Each patient's call is in clinical.csv, the withheld one's reason instead.
    rows = {r["patient"]: r for r in csv.DictReader((tmp_path / "c" / "clinical.csv").read_text().splitlines())}
    assert rows["patient003"]["diagnosis"] == line.rsplit(": ", 1)[1].split()[0] and rows["patient003"]["p_RV"]
    assert rows["patient002"]["diagnosis_withheld"] == "es_above_ed_lv" and rows["patient002"]["diagnosis"] == ""


def test_evaluate_without_splits_scores_the_split_test_shards_hold(official, tmp_path, capsys):
    """Shards of a test set (``prepare --val-fraction 0``) hold train only: ``report evaluate`` without
    ``--splits`` scores it and says so; ``clinical`` (val by default) still refuses in one line."""
    src, _, _ = official
    prepare(PrepareConfig(source=src, out=tmp_path / "test", val_fraction=0.0, progress=False))
    masks = _write_masks(src, tmp_path / "preds", lambda case: f"{case}.nii.gz")
    assert report_cli.main(["evaluate", "--masks", str(masks), "--data", str(tmp_path / "test")]) == 0
    out, err = capsys.readouterr()
    assert "holds no val split (a test set, prepared with --val-fraction 0?): scoring its train split" in err
    assert "| train | all | 1.000 | 1.000 | 1.000 | 1.000 |" in out and "| val |" not in out
    with pytest.raises(SystemExit):
        report_cli.main(["clinical", "--masks", str(masks), "--data", str(tmp_path / "test"), "--out", str(tmp_path / "c")])
    assert capsys.readouterr().err.strip().endswith("holds no val split; give --splits train (a test set: prepare it "
                                                    "with --val-fraction 1, all val)")
