"""analysis.levels and `report evaluate --by-level`: base / mid / apex thirds, Dice and volume errors."""

import json

import numpy as np
import pytest
from conftest import write_checkpoint
from synth import make_h5_dataset, write_info_csv

from raysegment.analysis.levels import level_records, level_slices, level_summary
from raysegment.cli import report as report_cli
from raysegment.data.dataset import load_volumes
from raysegment.data.prepare import PrepareConfig, prepare
from raysegment.reporting.report import level_table


def _heart(z: int = 10) -> np.ndarray:
    """Labels on slices 1..7, the heart widest at the base (slice 1) and narrowing to the apex."""
    gt = np.zeros((z, 20, 20), np.uint8)
    for k in range(1, 8):
        r = 9 - k
        gt[k, 10 - r:10 + r, 2:8] = 1  # RV
        gt[k, 10 - r:10 + r, 10:10 + r] = 3  # LV
    gt[1:8, 9, 10:12] = 2  # a strip of myocardium
    return gt


def test_levels_cut_the_reference_in_thirds_from_the_base_and_take_the_slices_beyond_it():
    levels = level_slices(_heart())
    assert {k: v.tolist() for k, v in levels.items()} == {"base": [0, 1, 2, 3], "mid": [4, 5], "apex": [6, 7, 8, 9]}
    flipped = level_slices(_heart()[::-1])  # a stack that runs from the apex: the base is found at its end
    assert {k: v.tolist() for k, v in flipped.items()} == {"base": [6, 7, 8, 9], "mid": [4, 5], "apex": [0, 1, 2, 3]}
    assert all(v.size == 0 for v in level_slices(np.zeros((4, 5, 5), np.uint8)).values())
    short = level_records(np.ones((2, 4, 4), np.uint8), np.pad(np.ones((2, 2, 2), np.uint8), ((0, 0), (1, 1), (1, 1))),
                          (1.0, 1.0, 1.0))  # two slices: no apex third, and nothing to score there
    assert [r["slices"] for r in short if r["class"] == "rv"] == [1, 1, 0]
    assert np.isnan(short[-1]["dice"]) and short[0]["extra"] == 0 and short[0]["dice"] == pytest.approx(8 / 20)


def test_level_records_charge_each_error_to_its_level():
    gt = _heart()
    pred = gt.copy()
    pred[6:8][pred[6:8] == 1] = 0  # the RV missed on the two apical slices
    pred[9, 0:2, 0:5] = 3  # 10 voxels of LV below the reference's apex
    rows = {(r["level"], r["class"]): r for r in level_records(pred, gt, (10.0, 1.0, 1.0), patient="p")}
    assert rows[("base", "rv")]["dice"] == rows[("mid", "lv")]["dice"] == 1.0
    assert rows[("apex", "rv")]["dice"] == 0.0 and rows[("apex", "rv")]["pred_ml"] == 0.0
    assert rows[("apex", "lv")]["pred_ml"] - rows[("apex", "lv")]["gt_ml"] == pytest.approx(10 * 0.01)
    assert sum(rows[(lev, "rv")]["gt_ml"] for lev in ("base", "mid", "apex")) == pytest.approx((gt == 1).sum() * 0.01)
    assert rows[("apex", "rv")]["patient"] == "p" and rows[("apex", "rv")]["slices"] == 4
    assert (rows[("apex", "rv")]["missed"], rows[("apex", "rv")]["extra"]) == (2, 0)
    assert (rows[("apex", "lv")]["missed"], rows[("apex", "lv")]["extra"]) == (0, 1)
    assert sum(r["missed"] + r["extra"] for r in rows.values()) == 3
    no_rv = level_records(np.where(gt == 1, 0, gt), np.where(gt == 1, 0, gt), (10.0, 1.0, 1.0))
    assert all(np.isnan(r["dice"]) for r in no_rv if r["class"] == "rv")  # nothing to find, nothing found: left out
    summary = {(r["level"], r["class"]): r for r in level_summary(no_rv + level_records(pred, gt, (10.0, 1.0, 1.0)))}
    assert summary[("apex", "rv")]["n"] == 1 and summary[("apex", "rv")]["dice"] == 0.0
    assert summary[("apex", "lv")]["error_ml"] == pytest.approx(0.05)  # +0.1 mL in one volume of two
    assert summary[("apex", "rv")]["missed"] == 2
    # Which slices: the two apical RV slices (2r × 6 voxels, r = 9 − k) and the LV blob's.
    assert rows[("apex", "rv")]["missed_slices"] == [[6, 36], [7, 24]] and rows[("apex", "lv")]["extra_slices"] == [[9, 10]]
    assert all(r["missed_slices"] == [] for key, r in rows.items() if key != ("apex", "rv"))
    records = [{**r, "split": "val", "phase": "ED"} for r in level_records(pred, gt, (10.0, 1.0, 1.0), patient="p")]
    table = level_table(records)
    assert "| val | ED | apex | 0.000 | 1.000 | " in table and "| 2 / 0, 0 / 0, 0 / 1 |" in table
    assert table.endswith("Slices missed whole, largest first: val p ED RV slice 6 (apex, 36 px); "
                          "val p ED RV slice 7 (apex, 24 px).")
    assert level_table(records, top=1).endswith("RV slice 6 (apex, 36 px); and 1 more.")
    assert "missed whole" not in level_table([{**r, "split": "val", "phase": "ED"} for r in no_rv])


def test_evaluate_by_level_writes_levels_whose_volumes_add_up(tmp_path, tiny_model, capsys):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,), shape=(6, 40, 48))
    write_info_csv(src, {f"patient00{p}": ("NOR", 170, 70, 20, 1, 2, 6, 1.5, 8.0) for p in (1, 2)})
    prepare(PrepareConfig(source=src, out=tmp_path / "shards", progress=False))
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    args = ["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "shards"), "--splits", "val"]
    assert report_cli.main(args + ["--by-level", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| val | ES | apex |" in out and (tmp_path / "out" / "levels.md").read_text().startswith("| split |")
    assert (tmp_path / "out" / "levels.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((tmp_path / "out" / "levels.json").read_text())
    for v in load_volumes(tmp_path / "shards", "val"):
        mine = [r for r in rows if r["phase"] == v.phase]
        assert len(mine) == 9
        voxel_ml = float(np.prod(v.spacing)) / 1000.0
        for lab, name in ((1, "rv"), (2, "myo"), (3, "lv")):
            got = sum(r["gt_ml"] for r in mine if r["class"] == name)
            assert got == pytest.approx((v.label == lab).sum() * voxel_ml)
    assert report_cli.main(args) == 0  # without --by-level: the Dice table alone
    assert "| level |" not in capsys.readouterr().out
