"""Clinical indices (mL, g, EF %) against hand-computed values, and QC flags."""

import math

import numpy as np
import pytest

from raysegment.clinical import (add_cine_ef, add_patient_ef, ejection_fraction, myocardial_mass_g, qc_flags,
                                 volumes_ml)


def _mask(rv: int, myo: int, lv: int, shape=(10, 100, 100)) -> np.ndarray:
    flat = np.zeros(int(np.prod(shape)), np.uint8)
    flat[:rv] = 1
    flat[rv : rv + myo] = 2
    flat[rv + myo : rv + myo + lv] = 3
    return flat.reshape(shape)


def test_volumes_mass_and_ef_by_hand():
    zooms = (1.25, 1.25, 8.0)  # mm: 12.5 µL per voxel
    ed, es = _mask(rv=12000, myo=9000, lv=10000), _mask(rv=7000, myo=9500, lv=4000)
    v_ed, v_es = volumes_ml(ed, zooms), volumes_ml(es, zooms)
    assert v_ed == pytest.approx({"rv": 150.0, "myo": 112.5, "lv": 125.0})
    assert v_es == pytest.approx({"rv": 87.5, "myo": 118.75, "lv": 50.0})
    assert myocardial_mass_g(v_ed["myo"]) == pytest.approx(118.125)
    assert ejection_fraction(v_ed["lv"], v_es["lv"]) == pytest.approx(60.0)  # (125 - 50) / 125
    assert ejection_fraction(v_ed["rv"], v_es["rv"]) == pytest.approx(41.6667, abs=1e-4)  # (150 - 87.5) / 150
    assert math.isnan(ejection_fraction(0.0, 0.0))


def _row(study, phase, vols):
    return {"study": study, "phase": phase, "status": "done", **{f"volume_{k}_ml": v for k, v in vols.items()}}


def test_patient_ef_pairs_ed_and_es_of_one_folder():
    rows = [_row("/p1/patient001_frame01.nii.gz", "ED", {"lv": 125.0, "rv": 150.0}),
            _row("/p1/patient001_frame12.nii.gz", "ES", {"lv": 50.0, "rv": 87.5}),
            _row("/p2/patient002_frame01.nii.gz", "ED", {"lv": 100.0, "rv": 100.0})]  # no ES: no EF
    add_patient_ef(rows)
    assert rows[0]["ef_lv_pct"] == rows[1]["ef_lv_pct"] == pytest.approx(60.0)
    assert rows[0]["ef_rv_pct"] == pytest.approx(41.6667, abs=1e-4)
    assert "ef_lv_pct" not in rows[2]


def test_cine_ef_takes_the_largest_and_smallest_frame():
    rows = [{"volume_lv_ml": v, "volume_rv_ml": 2 * v} for v in (100.0, 80.0, 40.0, 90.0)]
    add_cine_ef(rows)
    assert [r["ef_lv_pct"] for r in rows] == pytest.approx([60.0] * 4)
    assert [r["ef_rv_pct"] for r in rows] == pytest.approx([60.0] * 4)
    single = [{"volume_lv_ml": 10.0, "volume_rv_ml": 10.0}]
    add_cine_ef(single)
    assert "ef_lv_pct" not in single[0]


def test_qc_flags_name_missing_and_implausible_structures():
    zooms = (1.25, 1.25, 8.0)
    ok = _mask(rv=8000, myo=8000, lv=8000)
    huge_lv = _mask(rv=8000, myo=8000, lv=45000)  # 562.5 mL: no adult LV cavity is that big
    no_rv = _mask(rv=0, myo=8000, lv=100)  # LV 1.25 mL: implausibly small

    def row(m):
        counts = np.bincount(m.ravel(), minlength=4)
        return {**{f"voxels_{n}": int(counts[i]) for i, n in ((1, "rv"), (2, "myo"), (3, "lv"))},
                **{f"volume_{k}_ml": v for k, v in volumes_ml(m, zooms).items()}}

    assert qc_flags(row(ok)) == []
    assert qc_flags(row(huge_lv)) == ["implausible_volume_lv"]
    assert qc_flags(row(no_rv)) == ["missing_rv", "implausible_volume_lv"]
