"""Clinical indices from label volumes (mL, g, %) and plausibility checks (QC flags)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from raysegment import CLASS_NAMES

MYOCARDIUM_DENSITY_G_PER_ML = 1.05
# QC bounds (mL) for a single cavity or myocardium of an adult heart; outside is implausible.
PLAUSIBLE_ML = (2.0, 500.0)


def voxel_counts(mask_zyx: np.ndarray) -> np.ndarray:
    """Voxels of each label (index = label, background included)."""
    return np.bincount(mask_zyx.ravel(), minlength=len(CLASS_NAMES) + 1)


def volumes_ml(mask_zyx: np.ndarray, zooms_xyz, counts: np.ndarray | None = None) -> dict[str, float]:
    """Volume (mL) of each structure: voxel count × voxel volume (``zooms_xyz`` in mm); pass the
    mask's ``voxel_counts`` when they are at hand."""
    voxel_ml = float(np.prod(zooms_xyz)) / 1000.0
    counts = voxel_counts(mask_zyx) if counts is None else counts
    return {name: float(counts[lab]) * voxel_ml for lab, name in CLASS_NAMES.items()}


def myocardial_mass_g(myo_ml: float) -> float:
    """LV myocardial mass (g) from the myocardium's volume (mL) at 1.05 g/mL."""
    return myo_ml * MYOCARDIUM_DENSITY_G_PER_ML


def ejection_fraction(edv_ml: float, esv_ml: float) -> float:
    """EF (%) = (EDV − ESV) / EDV; NaN when the end-diastolic volume is 0."""
    return 100.0 * (edv_ml - esv_ml) / edv_ml if edv_ml > 0 else math.nan


def add_cine_ef(rows: list[dict]) -> None:
    """EF (%) for the frames of one 4-D study: ED = the frame of largest volume, ES = smallest."""
    if len(rows) < 2:
        return
    for name in ("lv", "rv"):
        vols = [r[f"volume_{name}_ml"] for r in rows]
        ef = ejection_fraction(max(vols), min(vols))
        for r in rows:
            r[f"ef_{name}_pct"] = ef


def ed_es_pairs(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Patient → {"ED": row, "ES": row} of finished result rows: an official-layout folder (its two
    frame files, Info.cfg names them) or a DICOM cine series (``dicom:…``; ED and ES are two of its
    frames). Patients missing either phase are left out."""
    by_patient: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("status") == "done" and r.get("phase") in ("ED", "ES"):
            dicom = r["study"].startswith("dicom:")
            if dicom or r.get("frame", 0) == 0:
                by_patient.setdefault(r["study"] if dicom else str(Path(r["study"]).parent), {})[r["phase"]] = r
    return {key: phases for key, phases in by_patient.items() if set(phases) == {"ED", "ES"}}


def add_patient_ef(table: list[dict]) -> None:
    """EF (%) for patients whose ED and ES were both segmented (``ed_es_pairs``)."""
    for phases in ed_es_pairs(table).values():
        for name in ("lv", "rv"):
            ef = ejection_fraction(phases["ED"][f"volume_{name}_ml"], phases["ES"][f"volume_{name}_ml"])
            phases["ED"][f"ef_{name}_pct"] = phases["ES"][f"ef_{name}_pct"] = ef


def qc_flags(row: dict) -> list[str]:
    """``missing_<structure>`` (no voxels) or ``implausible_volume_<structure>`` (outside PLAUSIBLE_ML)."""
    flags = []
    for name in CLASS_NAMES.values():
        if row[f"voxels_{name}"] == 0:
            flags.append(f"missing_{name}")
        elif not PLAUSIBLE_ML[0] <= row[f"volume_{name}_ml"] <= PLAUSIBLE_ML[1]:
            flags.append(f"implausible_volume_{name}")
    return flags


# --------------------------------------------------------------------------- per-patient indices (ED + ES)

INDEXED = ("lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "rv_edv_ml", "rv_esv_ml", "rv_sv_ml", "lv_mass_g")


def body_surface_area_m2(height_cm: float | None, weight_kg: float | None) -> float | None:
    """Mosteller's body-surface area (m²) = √(height cm × weight kg / 3600); None when either is unknown."""
    if not height_cm or not weight_kg or height_cm <= 0 or weight_kg <= 0:
        return None
    return math.sqrt(height_cm * weight_kg / 3600.0)


def wall_thickness_mm(mask_zyx: np.ndarray, spacing_zyx) -> dict[str, float]:
    """LV myocardial wall thickness (mm) over the mid-ventricle: the middle third of the slices that
    hold both myocardium and LV cavity. At each endocardial pixel (myocardium touching the cavity)
    the thickness is its in-plane distance to the nearest pixel outside myocardium ∪ cavity.
    Returns max, mean and SD of those samples (NaN without such slices)."""
    from scipy import ndimage

    dy, dx = float(spacing_zyx[1]), float(spacing_zyx[2])
    both = [k for k in range(mask_zyx.shape[0]) if (mask_zyx[k] == 2).any() and (mask_zyx[k] == 3).any()]
    if not both:
        return {"max": math.nan, "mean": math.nan, "sd": math.nan}
    n = len(both)
    mid = both[n // 3 : n - n // 3] or both
    cross = ndimage.generate_binary_structure(2, 1)
    samples = []
    for k in mid:
        myo, lv = mask_zyx[k] == 2, mask_zyx[k] == 3
        inside = np.pad(myo | lv, 1)  # a heart touching the border still has an outside
        dist = ndimage.distance_transform_edt(inside, sampling=(dy, dx))[1:-1, 1:-1]
        endo = myo & ndimage.binary_dilation(lv, cross)
        samples.append(dist[endo])
    t = np.concatenate(samples)
    if t.size == 0:
        return {"max": math.nan, "mean": math.nan, "sd": math.nan}
    return {"max": float(t.max()), "mean": float(t.mean()), "sd": float(t.std())}


def patient_indices(ed_zyx: np.ndarray, es_zyx: np.ndarray, spacing_zyx, height_cm: float | None = None,
                    weight_kg: float | None = None) -> dict[str, float]:
    """Clinical indices of one patient from its ED and ES label volumes (``spacing_zyx`` in mm):
    EDV, ESV, SV (mL), EF (%) of LV and RV; LV myocardial mass at ED (g); ED mid-ventricular wall
    thickness (mm); with height and weight, BSA (m²) and the volumes and mass indexed by it
    (``*_per_m2``: mL/m², g/m²). Also, for features: the ES myocardial volume (mL), the ES wall
    thickness (mm) and the systolic wall thickening (%)."""
    zooms_xyz = tuple(float(s) for s in spacing_zyx)[::-1]
    ed, es = volumes_ml(ed_zyx, zooms_xyz), volumes_ml(es_zyx, zooms_xyz)
    out = {}
    for name in ("lv", "rv"):
        edv, esv = ed[name], es[name]
        out |= {f"{name}_edv_ml": edv, f"{name}_esv_ml": esv, f"{name}_sv_ml": edv - esv,
                f"{name}_ef_pct": ejection_fraction(edv, esv)}
    out["lv_mass_g"] = myocardial_mass_g(ed["myo"])
    out["myo_es_ml"] = es["myo"]
    thick_ed, thick_es = wall_thickness_mm(ed_zyx, spacing_zyx), wall_thickness_mm(es_zyx, spacing_zyx)
    out |= {f"myo_thickness_{k}_mm": v for k, v in thick_ed.items()}
    out |= {f"myo_es_thickness_{k}_mm": v for k, v in thick_es.items()}
    # Systolic wall thickening (%): low in infarcted and dilated hearts.
    out["myo_thickening_pct"] = 100.0 * (thick_es["mean"] - thick_ed["mean"]) / thick_ed["mean"] \
        if thick_ed["mean"] > 0 else math.nan
    bsa = body_surface_area_m2(height_cm, weight_kg)
    out["bsa_m2"] = math.nan if bsa is None else bsa
    for key in INDEXED:
        out[key.rsplit("_", 1)[0] + ("_g_per_m2" if key.endswith("_g") else "_ml_per_m2")] = \
            math.nan if bsa is None else out[key] / bsa
    return out


def agreement(pred, ref) -> dict[str, float]:
    """Agreement of measured (``pred``) with reference values: n, MAE, bias (mean of pred − ref),
    SD of the differences, 95 % limits of agreement (bias ± 1.96 SD, Bland-Altman) and Pearson r.
    Pairs with a NaN are left out."""
    p, r = np.asarray(pred, float), np.asarray(ref, float)
    ok = np.isfinite(p) & np.isfinite(r)
    p, r = p[ok], r[ok]
    if p.size == 0:
        return {"n": 0, "mae": math.nan, "bias": math.nan, "sd": math.nan, "loa_low": math.nan,
                "loa_high": math.nan, "r": math.nan}
    d = p - r
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    corr = float(np.corrcoef(p, r)[0, 1]) if p.size > 1 and p.std() > 0 and r.std() > 0 else math.nan
    return {"n": int(p.size), "mae": float(np.abs(d).mean()), "bias": float(d.mean()), "sd": sd,
            "loa_low": float(d.mean() - 1.96 * sd), "loa_high": float(d.mean() + 1.96 * sd), "r": corr}


# --------------------------------------------------------------------------- the basal ES slice of the RV

BASAL_SLICES = 2  # the most basal slices looked at (slice 0 is the base in ACDC stacks)
BASAL_FEATURES = ("rv_es_over_ed", "rv_over_next_slice", "lv_es_over_ed", "myo_over_next_slice", "rv_over_lv_myo",
                  "slice")


def basal_rv_features(ed_zyx: np.ndarray, es_zyx: np.ndarray, k: int) -> np.ndarray:
    """Log area ratios (voxels) describing the RV on ES slice ``k``: against the same slice at ED, the
    next slice towards the apex, and the LV there; and ``k`` itself."""
    def area(m, kk, lab):
        return float((m[kk] == lab).sum())

    rv = area(es_zyx, k, 1)
    ratios = [rv / max(area(ed_zyx, k, 1), 1), rv / max(area(es_zyx, k + 1, 1), 1),
              area(es_zyx, k, 3) / max(area(ed_zyx, k, 3), 1), area(es_zyx, k, 2) / max(area(es_zyx, k + 1, 2), 1),
              rv / max(area(es_zyx, k, 3) + area(es_zyx, k, 2), 1)]
    return np.array([math.log(r + 1e-3) for r in ratios] + [float(k)])


def basal_rv_check(ed_zyx: np.ndarray, es_zyx: np.ndarray, check: dict | None) -> tuple[np.ndarray, list[int]]:
    """The ES labels without RV on the basal slices where ``check`` (a logistic model fitted on
    training patients: ``mean, scale, coef, intercept, threshold``) says the reference draws none.

    At end-systole the base moves towards the apex, so the most basal ES slice often cuts the right
    atrium or outflow tract, which ACDC's reference leaves unlabelled; a 2-D network labels it RV
    and the ES volume grows (RV EF reads low). Slices are looked at from the base; the first one
    kept ends the walk. Slice 0 is taken as the base when the heart's ED cross-section is larger in
    the first half of the stack (as in every ACDC volume); a DICOM stack sorted along its normal may
    run from the apex, and is then walked from its last slice. Returns (labels, slices cleared)."""
    if check is None:
        return es_zyx, []
    areas = (ed_zyx > 0).reshape(ed_zyx.shape[0], -1).sum(1)
    half = len(areas) // 2
    if areas[:half].sum() < areas[len(areas) - half:].sum():  # the base is at the end: walk it reversed
        out, cleared = basal_rv_check(ed_zyx[::-1], es_zyx[::-1], check)
        n = es_zyx.shape[0]
        return (np.ascontiguousarray(out[::-1]) if cleared else es_zyx), sorted(n - 1 - k for k in cleared)
    out, cleared = es_zyx, []
    for k in range(min(BASAL_SLICES, es_zyx.shape[0] - 1)):
        if not (out[k] == 1).any():
            continue
        z = (basal_rv_features(ed_zyx, out, k) - np.asarray(check["mean"])) / np.asarray(check["scale"])
        p = 1.0 / (1.0 + math.exp(-(float(z @ np.asarray(check["coef"])) + check["intercept"])))
        if p <= check["threshold"]:
            break
        if out is es_zyx:
            out = es_zyx.copy()
        out[k][out[k] == 1] = 0
        cleared.append(k)
    return out, cleared
