"""report: evaluation tables through the Predictor, figures, refusals with one error line."""

import csv

import numpy as np
import pytest
from conftest import write_checkpoint
from synth import make_h5_dataset, write_info_csv

from raysegment.cli import report as report_cli
from raysegment.data.dataset import all_volumes, load_volumes
from raysegment.data.prepare import PrepareConfig, load_manifest, prepare
from raysegment.inference import evaluation
from raysegment.reporting import report


@pytest.fixture
def shards(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,), shape=(3, 40, 48))
    prepare(PrepareConfig(source=src, out=tmp_path / "shards", progress=False))
    return tmp_path / "shards"


def test_figures_write_learning_curves_and_overlays(tmp_path, tiny_model, shards):
    history = [{"epoch": e, "loss": 1.0 / (e + 1), "dice_rv": 0.1 * e, "dice_myo": 0.1 * e, "dice_lv": 0.2 * e,
                "dice_mean": 0.13 * e} for e in range(3)]
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model, {"epoch": 2, "history": history})
    written = evaluation.figures({"tiny": str(ckpt)}, shards, tmp_path / "fig")
    names = sorted(p.name for p in written)
    assert names == ["learning_curves.png", "overlay_tiny_patient002_ED.png", "overlay_tiny_patient002_ES.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_evaluate_scores_a_model_and_an_ensemble(tmp_path, tiny_model, shards, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    records = evaluation.evaluate(str(ckpt), shards, splits=("val",))
    assert len(records) == 2 * 3 and {r["phase"] for r in records} == {"ED", "ES"}
    assert all(0 <= r["dice"] <= 1 and r["split"] == "val" for r in records)
    same_twice = evaluation.evaluate([str(ckpt), str(ckpt)], shards, splits=("val",))  # an ensemble of one model twice
    assert [r["dice"] for r in same_twice] == pytest.approx([r["dice"] for r in records])
    assert report_cli.main(["evaluate", "--model", str(ckpt), "--data", str(shards), "--splits", "val"]) == 0
    assert "| val | all |" in capsys.readouterr().out


def test_evaluate_with_a_mask_cache_scores_the_same_and_shares_the_masks_with_clinical(tmp_path, tiny_model, shards):
    from raysegment.config import PredictConfig
    from raysegment.data.dataset import load_volumes
    from raysegment.inference.predictor import Predictor, predicted_masks

    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    cache = tmp_path / "masks"
    streamed = evaluation.evaluate(str(ckpt), shards, splits=("val",))
    cached = evaluation.evaluate(str(ckpt), shards, splits=("val",), mask_cache=cache)
    assert cached == streamed
    (saved,) = cache.glob("masks-*.npz")  # the key `report clinical --splits val` computes for the same model
    masks = predicted_masks(Predictor.load(str(ckpt), PredictConfig()), load_volumes(shards, "val"), cache)
    assert list(cache.glob("masks-*.npz")) == [saved]
    assert len(masks) == 2
    with np.load(saved) as z:  # emptied masks on disk: a second evaluate must score what it reads back
        empty = {k: np.zeros_like(z[k]) for k in z.files}
    np.savez(saved, **empty)
    reread = evaluation.evaluate(str(ckpt), shards, splits=("val",), mask_cache=cache)
    assert [r["dice"] for r in reread] == [0.0] * len(streamed) != [r["dice"] for r in streamed]


def test_flip_tta_is_refused_in_one_line(tmp_path, tiny_model, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")  # refused before any shard is read
    args = ["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "shards"), "--splits", "val", "--flip-tta"]
    assert report_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: flip TTA needs a model trained with left-right flips")


def test_report_refuses_missing_shards_and_unknown_splits_in_one_line(tmp_path, capsys):
    for args, message in ((["--data", str(tmp_path / "nothing")], "no shards there"),
                          (["--data", str(tmp_path), "--splits", "test"], "invalid choice: 'test'")):
        with pytest.raises(SystemExit) as exit_:
            report_cli.main(["evaluate", "--model", "shipped:mobilenet_v2", *args])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no val shards there"):  # every reader of whole volumes
        load_volumes(tmp_path / "s", "val")
    # Shards of a source without train.txt / val.txt are all train: evaluate's default (train and
    # val) and clinical's (val) said "no val shards there (make them with … prepare)" after loading.
    (tmp_path / "s" / "train").mkdir()
    (tmp_path / "s" / "train" / "part-0.parquet").write_bytes(b"")
    # Now clinical's (val: the patients no model trained on) refuses them in one line, and so does
    # evaluate when --splits names val; evaluate without --splits scores the split they hold.
    for cmd in (["evaluate", "--splits", "val"], ["clinical", "--out", str(tmp_path / "c")]):
        with pytest.raises(SystemExit) as exit_:
            report_cli.main([*cmd, "--model", "shipped:mobilenet_v2", "--data", str(tmp_path / "s")])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            "holds no val split; give --splits train (a test set: prepare it with --val-fraction 1, all val)"), cmd
    with pytest.raises(FileNotFoundError, match=r"no val shards there \(it holds the train split only\)"):
        load_volumes(tmp_path / "s", "val")


def test_dice_table_rows_and_means():
    recs = [{"split": s, "phase": ph, "class": c, "dice": d, "hd95": 1.0, "assd": 0.5, "unit": "voxels"}
            for s in ("train", "val") for ph in ("ED", "ES")
            for c, d in (("rv", 0.8), ("myo", 0.9), ("lv", 1.0 if ph == "ED" else 0.7))]
    table = report.dice_table(recs).splitlines()
    assert table[2].startswith("| train | all | 0.800 | 0.900 | 0.850 | 0.850 |")
    assert table[4].startswith("| train | ES | 0.800 | 0.900 | 0.700 | 0.800 |")
    assert np.isclose(float(table[5].split("|")[6]), (0.8 + 0.9 + 0.85) / 3, atol=1e-3)


def test_clinical_report_scores_masks_against_the_reference_and_draws_bland_altman(tmp_path, tiny_model, capsys):
    from raysegment.analysis import diagnosis

    src = make_h5_dataset(tmp_path / "src", patients=(1, 2, 3), val=(3,), shape=(3, 40, 48))
    write_info_csv(src, {f"patient00{p}": ("NOR", 170, 70, 20, 1, 8, 3, 1.5, 8.0) for p in (1, 2, 3)})
    shards = tmp_path / "shards"
    prepare(PrepareConfig(source=src, out=shards, progress=False))
    # Perfect "cross-validated masks" (the reference itself): every index agrees exactly.
    volumes = all_volumes(shards)
    np.savez_compressed(tmp_path / "fold0.npz", **{f"{v.patient}/{v.phase}": v.label for v in volumes})
    out = tmp_path / "clin"
    assert report_cli.main(["clinical", "--masks", str(tmp_path), "--data", str(shards), "--splits", "train", "val",
                        "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 patients (train, val)" in text and "| lv_ef_pct | 3 | 0.00 | +0.00 |" in text
    assert (out / "bland_altman.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "clinical.csv").read_text().splitlines()
    assert len(rows) == 4 and "pred_rv_ef_pct" in rows[0] and "ref_lv_mass_g" in rows[0]
    # With the shipped basal ES check: its expected excess comes off the ES volumes, and the CSV holds
    # every record's values in their own columns (the per-slice probabilities are text).
    checked = tmp_path / "checked"
    assert report_cli.main(["clinical", "--masks", str(tmp_path), "--data", str(shards), "--splits", "train", "val",
                        "--basal-check", "shipped", "--diagnosis", "shipped", "--out", str(checked)]) == 0
    # --diagnosis: the shipped classifier's calls on these masks (its own basal check) against the groups.
    shipped = diagnosis.load("shipped")
    names, x, _ = diagnosis.patient_features(volumes, diagnosis.load_crossval_masks(tmp_path, volumes),
                                             load_manifest(shards)["patients"], shipped.basal_rv)
    calls = dict(zip(names, shipped.predict(x)))
    right = sum(g == "NOR" for g in calls.values())
    line = f"Diagnosis (shipped): {right}/3 right"
    assert line in capsys.readouterr().out and line in (checked / "clinical.md").read_text()
    with open(checked / "clinical.csv", newline="") as f:
        recs = list(csv.DictReader(f))
    # Every column filled, but the per-slice probabilities of a structure the shipped check learnt no
    # model for (its 2026-12-05 refit kept only the whole-heart one): those are empty by design.
    unlearnt = {f"p_no_{k}" for k in ("rv", "heart") if k not in shipped.basal_rv}
    assert len(recs) == 3 and all(None not in r and all(v != "" or k in unlearnt for k, v in r.items()) for r in recs)
    for r in recs:
        excess = float(r["rv_es_basal_excess_ml"])
        assert float(r["pred_rv_esv_ml"]) == pytest.approx(float(r["ref_rv_esv_ml"]) - excess, abs=1e-3)
    # A model's masks: segmented here, on the val split by default.
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    assert report_cli.main(["clinical", "--model", str(ckpt), "--data", str(shards), "--out", str(tmp_path / "m")]) == 0
    assert "1 patients (val)" in capsys.readouterr().out
    # Shards without spacing: one line, exit 2.
    (src / "info.csv").unlink()
    prepare(PrepareConfig(source=src, out=tmp_path / "bare", progress=False))
    assert report_cli.main(["clinical", "--masks", str(tmp_path), "--data", str(tmp_path / "bare"), "--out", str(out)]) == 2
    assert "no spacing" in capsys.readouterr().err


def test_figures_command_writes_its_pngs(tmp_path, tiny_model, shards, capsys):
    """Any model reference, as everywhere (``shipped:`` was read as a file name); one that is not
    there: one error line before anything is drawn."""
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    assert report_cli.main(["figures", "--model", f"tiny={ckpt}", "--model", "shipped:mobilenet_v2", "--data", str(shards),
                            "--out", str(tmp_path / "f")]) == 0
    written = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert written == ["learning_curves.png",  # the shipped file's history; the tiny checkpoint has none
                       "overlay_mobilenet_v2_patient002_ED.png", "overlay_mobilenet_v2_patient002_ES.png",  # no colon
                       "overlay_tiny_patient002_ED.png", "overlay_tiny_patient002_ES.png"]
    printed = capsys.readouterr().out
    assert all(name in printed for name in written), printed
    for args in (["figures", "--model", "a=shipped:resnet", "--out", str(tmp_path / "g")],
                 ["clinical", "--model", "shipped:resnet", "--out", str(tmp_path / "g")]):
        with pytest.raises(SystemExit) as exit_:
            report_cli.main([*args, "--data", str(shards)])
        assert exit_.value.code == 2 and "no such shipped model" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "g").exists()
