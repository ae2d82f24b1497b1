"""report: evaluation tables through the Predictor, figures, refusals with one error line."""

import numpy as np
import pytest

from conftest import write_checkpoint
from raysegment import report
from raysegment.prepare import PrepareConfig, prepare
from synth import make_h5_dataset


@pytest.fixture
def shards(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,), shape=(3, 40, 48))
    prepare(PrepareConfig(source=src, out=tmp_path / "shards", progress=False))
    return tmp_path / "shards"


def test_figures_write_learning_curves_and_overlays(tmp_path, tiny_model, shards):
    history = [{"epoch": e, "loss": 1.0 / (e + 1), "dice_rv": 0.1 * e, "dice_myo": 0.1 * e, "dice_lv": 0.2 * e,
                "dice_mean": 0.13 * e} for e in range(3)]
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model, {"epoch": 2, "history": history})
    written = report.figures({"tiny": str(ckpt)}, shards, tmp_path / "fig")
    names = sorted(p.name for p in written)
    assert names == ["learning_curves.png", "overlay_tiny_patient002_ED.png", "overlay_tiny_patient002_ES.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_evaluate_scores_a_model_and_an_ensemble(tmp_path, tiny_model, shards, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    records = report.evaluate(str(ckpt), shards, splits=("val",))
    assert len(records) == 2 * 3 and {r["phase"] for r in records} == {"ED", "ES"}
    assert all(0 <= r["dice"] <= 1 and r["split"] == "val" for r in records)
    same_twice = report.evaluate([str(ckpt), str(ckpt)], shards, splits=("val",))  # an ensemble of one model twice
    assert [r["dice"] for r in same_twice] == pytest.approx([r["dice"] for r in records])
    assert report.main(["evaluate", "--model", str(ckpt), "--data", str(shards), "--splits", "val"]) == 0
    assert "| val | all |" in capsys.readouterr().out


def test_flip_tta_is_refused_in_one_line(tmp_path, tiny_model, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    args = ["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "no-shards"), "--splits", "val", "--flip-tta"]
    assert report.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: flip TTA needs a model trained with left-right flips")


def test_dice_table_rows_and_means():
    recs = [{"split": s, "phase": ph, "class": c, "dice": d, "hd95": 1.0, "assd": 0.5, "unit": "voxels"}
            for s in ("train", "val") for ph in ("ED", "ES")
            for c, d in (("rv", 0.8), ("myo", 0.9), ("lv", 1.0 if ph == "ED" else 0.7))]
    table = report.dice_table(recs).splitlines()
    assert table[2].startswith("| train | all | 0.800 | 0.900 | 0.850 | 0.850 |")
    assert table[4].startswith("| train | ES | 0.800 | 0.900 | 0.700 | 0.800 |")
    assert np.isclose(float(table[5].split("|")[6]), (0.8 + 0.9 + 0.85) / 3, atol=1e-3)
