"""Clinical indices (mL, g, EF %) against hand-computed values, and QC flags."""

import math

import numpy as np
import pytest

from raysegment.analysis.clinical import add_cine_ef, add_patient_ef, ejection_fraction, myocardial_mass_g, qc_flags, volumes_ml


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


def _ring_stack(n_slices=6, r_in=10, r_out=15, rv=True, shape=(60, 70)):
    """(z, y, x): LV disc radius r_in px, myocardium ring to r_out px, an RV disc beside it."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.hypot(yy - 30, xx - 40)
    m = np.zeros((n_slices, *shape), np.uint8)
    for k in range(n_slices):
        m[k][d < r_out] = 2
        m[k][d < r_in] = 3
        if rv:
            m[k][(np.hypot(yy - 30, xx - 12) < 8) & (m[k] == 0)] = 1
    return m


def test_patient_indices_by_hand():
    from raysegment.analysis.clinical import body_surface_area_m2, patient_indices

    ed = _ring_stack(r_in=10)
    es = _ring_stack(r_in=6)  # same epicardium, thicker wall at ES
    spacing = (8.0, 1.5, 1.25)  # z, y, x mm
    ind = patient_indices(ed, es, spacing, height_cm=180, weight_kg=80)
    vox_ml = 8.0 * 1.5 * 1.25 / 1000
    edv, esv = (ed == 3).sum() * vox_ml, (es == 3).sum() * vox_ml
    assert ind["lv_edv_ml"] == pytest.approx(edv) and ind["lv_esv_ml"] == pytest.approx(esv)
    assert ind["lv_sv_ml"] == pytest.approx(edv - esv)
    assert ind["lv_ef_pct"] == pytest.approx(100 * (edv - esv) / edv)
    assert ind["rv_ef_pct"] == pytest.approx(0.0)  # same RV at ED and ES
    assert ind["lv_mass_g"] == pytest.approx((ed == 2).sum() * vox_ml * 1.05)
    assert body_surface_area_m2(180, 80) == pytest.approx(2.0)  # Mosteller: √(180·80/3600)
    assert ind["bsa_m2"] == pytest.approx(2.0)
    assert ind["lv_edv_ml_per_m2"] == pytest.approx(edv / 2.0)
    assert ind["lv_mass_g_per_m2"] == pytest.approx(ind["lv_mass_g"] / 2.0)
    # A 5-px ring is 5 px thick; in mm between 5 × 1.25 and 5 × 1.5 (+ a pixel of boundary).
    assert 5 * 1.25 <= ind["myo_thickness_mean_mm"] <= 6 * 1.5
    assert ind["myo_es_thickness_mean_mm"] > ind["myo_thickness_mean_mm"]
    assert ind["myo_thickening_pct"] > 0
    unknown = patient_indices(ed, es, spacing)
    assert math.isnan(unknown["bsa_m2"]) and math.isnan(unknown["lv_edv_ml_per_m2"])


def test_wall_thickness_follows_the_ring_and_uses_the_mid_ventricle():
    from raysegment.analysis.clinical import wall_thickness_mm

    thin, thick = _ring_stack(r_in=10, r_out=13), _ring_stack(r_in=10, r_out=18)
    t_thin, t_thick = wall_thickness_mm(thin, (10, 1, 1)), wall_thickness_mm(thick, (10, 1, 1))
    assert t_thin["mean"] == pytest.approx(3, abs=1) and t_thick["mean"] == pytest.approx(8, abs=1)
    assert t_thick["sd"] < 1.0  # a concentric ring: one thickness all round
    # The basal and apical thirds do not count: a thick base changes nothing.
    base = _ring_stack(r_in=10, r_out=13)
    base[:2] = _ring_stack(n_slices=2, r_in=10, r_out=20)
    assert wall_thickness_mm(base, (10, 1, 1))["max"] == pytest.approx(t_thin["max"])
    assert math.isnan(wall_thickness_mm(np.zeros((3, 20, 20), np.uint8), (10, 1, 1))["mean"])


def test_agreement_properties_and_by_hand():
    from raysegment.analysis.clinical import agreement

    ref = np.array([50.0, 60, 70, 80])
    same = agreement(ref, ref)
    assert (same["mae"], same["bias"], same["sd"], same["r"]) == (0.0, 0.0, 0.0, pytest.approx(1.0))
    pred = ref + np.array([1.0, -1, 3, 1])
    a = agreement(pred, ref)
    d = pred - ref
    assert a["bias"] == pytest.approx(1.0) and a["mae"] == pytest.approx(1.5)
    assert a["loa_low"] == pytest.approx(1.0 - 1.96 * d.std(ddof=1))
    assert a["loa_high"] == pytest.approx(1.0 + 1.96 * d.std(ddof=1))
    flipped = agreement(ref, pred)  # swapping the roles flips the bias, keeps MAE, SD and r
    assert flipped["bias"] == pytest.approx(-a["bias"]) and flipped["mae"] == pytest.approx(a["mae"])
    assert flipped["r"] == pytest.approx(a["r"]) and flipped["sd"] == pytest.approx(a["sd"])
    with_nan = agreement(np.append(pred, np.nan), np.append(ref, 1.0))
    assert with_nan["n"] == 4 and with_nan["bias"] == pytest.approx(1.0)


def test_a_height_or_weight_in_the_wrong_unit_is_taken_as_unknown_and_flagged():
    """A height in metres (1.8 "cm"), a DICOM PatientSize typed in cm (×100: 18000) or pounds gave a
    BSA of 0.2 m² or 19 m² and indexed every volume by it; outside 100–250 cm and 20–350 kg the BSA is
    unknown and the patient flagged ``implausible_height_weight``, the diagnosis by the median BSA."""
    from raysegment.analysis.clinical import PATIENT_FLAGS, body_surface_area_m2
    from raysegment.analysis.patient import assess

    assert body_surface_area_m2(180, 80) == pytest.approx(2.0) and body_surface_area_m2(100, 20) is not None
    for h, w in ((1.8, 80), (18000, 80), (180, 800), (180, 0), (-180, 80), (float("nan"), 80), (None, 80)):
        assert body_surface_area_m2(h, w) is None, (h, w)
    ed, es, spacing = _ring_stack(r_in=10), _ring_stack(r_in=6), (8.0, 1.5, 1.25)
    flags = {(h, w): assess(ed, es, spacing, h, w)["patient_qc_flags"].split(";")
             for h, w in ((180, 80), (1.8, 80), (180, 400), (None, None), (180, None))}
    assert [f for f in flags[(180, 80)] if "height" in f] == []
    assert "implausible_height_weight" in flags[(1.8, 80)] and "implausible_height_weight" in flags[(180, 400)]
    assert "no_height_weight" in flags[(None, None)] and "no_height_weight" in flags[(180, None)]
    assert math.isnan(assess(ed, es, spacing, 1.8, 80)["lv_edv_ml_per_m2"])
    assert "metres, inches or pounds" in PATIENT_FLAGS["implausible_height_weight"]
