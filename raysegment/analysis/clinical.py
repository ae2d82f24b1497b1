"""Clinical indices from label volumes (mL, g, %) and plausibility checks (QC flags); the basal ES
check that comes before the indices is ``analysis.basal``.

Imports ``config`` and ``io.studies``; nothing above ``analysis``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from raysegment.config import CLASS_NAMES

MYOCARDIUM_DENSITY_G_PER_ML = 1.05
# QC bounds (mL) for a single cavity or myocardium of an adult heart; outside is implausible.
PLAUSIBLE_ML = (2.0, 500.0)
# An adult's height (cm) and weight (kg): outside, a unit went wrong (metres, inches, pounds; DICOM's
# PatientSize typed in cm) and a BSA from them would index every volume wrongly.
PLAUSIBLE_HEIGHT_CM = (100.0, 250.0)
PLAUSIBLE_WEIGHT_KG = (20.0, 350.0)


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


def mark_cine_phases(rows: list[dict]) -> None:
    """ED / ES as the ``phase`` of one cine study's frame rows: its largest / smallest LV volume
    (none when the LV does not change)."""
    if len(rows) >= 2:
        lv = [r["volume_lv_ml"] for r in rows]
        ed, es = int(np.argmax(lv)), int(np.argmin(lv))
        if ed != es:
            rows[ed]["phase"], rows[es]["phase"] = "ED", "ES"


def ed_es_pairs(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Patient → {"ED": row, "ES": row} of finished result rows: an official-layout folder (its two
    frame files, Info.cfg names them; keyed by the folder), a patient's two frames in an nnU-Net
    images folder (keyed ``…/imagesXx/patientNNN``) or a cine study — a DICOM series (``dicom:…``)
    or a 4-D NIfTI file — whose ED and ES are two of its frames (keyed by the study). Patients
    missing either phase are left out."""
    from raysegment.io.studies import nnunet_patient

    cine = {r["study"] for r in rows if r.get("frame", 0) > 0}
    by_patient: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("status") == "done" and r.get("phase") in ("ED", "ES"):
            key = (r["study"] if r["study"] in cine
                   else nnunet_patient(Path(r["study"])) or str(Path(r["study"]).parent))
            by_patient.setdefault(key, {})[r["phase"]] = r
    return {key: phases for key, phases in by_patient.items() if set(phases) == {"ED", "ES"}}


def unpaired_patients(rows: list[dict]) -> dict[str, str]:
    """Official-layout folders with a frame file segmented but no patient indices → why: Info.cfg
    without integer ED / ES or with ED = ES, a frame not segmented, the indices' own error, or no ED or ES frame."""
    from raysegment.io.studies import OFFICIAL_FRAME, study_stem

    pairs = ed_es_pairs(rows)
    official = [(str(Path(r["study"]).parent), r) for r in rows if OFFICIAL_FRAME.match(study_stem(Path(r["study"])))]
    done = {folder for folder, r in official if r.get("status") == "done"}
    why: dict[str, str] = {}
    for folder, r in official:
        if folder not in done or (folder in pairs and "clinical_error" not in pairs[folder]["ED"]):
            continue
        if "info_cfg_without_ed_es" in (r.get("qc_flags") or ""):
            why[folder] = "Info.cfg has no integer ED or ES line"
        elif "info_cfg_ed_equals_es" in (r.get("qc_flags") or ""):
            why[folder] = "Info.cfg gives ED and ES the same frame"
        elif r.get("status") != "done":
            why.setdefault(folder, f"{Path(r['study']).name} was not segmented ({r.get('status')})")
        elif r.get("clinical_error"):
            why.setdefault(folder, f"indices failed ({r['clinical_error']})")
    for folder in done - set(pairs) - set(why):
        why[folder] = "its ED or ES frame file is not among the studies"
    return why


# What each patient QC flag means, for the people reading a report.
PATIENT_FLAGS = {
    "es_above_ed_lv": "the LV's ES volume exceeds its ED volume (EF < 0): ED and ES swapped, or a mask gone "
                      "wrong; no diagnosis is given",
    "es_above_ed_rv": "the RV's ES volume exceeds its ED volume (EF < 0): ED and ES swapped, a mask gone wrong, "
                      "or an akinetic RV",
    "no_height_weight": "height or weight unknown: no BSA-indexed volumes; the diagnosis indexes the volumes by "
                        "its training patients' median BSA",
    "implausible_height_weight": f"height or weight outside {PLAUSIBLE_HEIGHT_CM[0]:.0f}–{PLAUSIBLE_HEIGHT_CM[1]:.0f} cm "
                                 f"or {PLAUSIBLE_WEIGHT_KG[0]:.0f}–{PLAUSIBLE_WEIGHT_KG[1]:.0f} kg (metres, inches or "
                                 "pounds?), taken as unknown: no BSA-indexed volumes; the diagnosis indexes the "
                                 "volumes by its training patients' median BSA",
}


def patient_flags(ind: dict, height_cm: float | None = None, weight_kg: float | None = None) -> list[str]:
    """The ``PATIENT_FLAGS`` that hold for a patient's indices: ``es_above_ed_<lv|rv>`` (an ES volume
    above the ED volume, mL); where ``bsa_m2`` is NaN, ``implausible_height_weight`` if both
    ``height_cm`` and ``weight_kg`` were given, else ``no_height_weight``."""
    flags = [f"es_above_ed_{n}" for n in ("lv", "rv") if ind[f"{n}_esv_ml"] > ind[f"{n}_edv_ml"]]
    if "bsa_m2" in ind and not math.isfinite(ind["bsa_m2"]):
        given = all(v is not None and math.isfinite(v) for v in (height_cm, weight_kg))
        flags.append("implausible_height_weight" if given else "no_height_weight")
    return flags


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
    """Mosteller's body-surface area (m²) = √(height cm × weight kg / 3600); None when either is
    unknown or implausible (outside ``PLAUSIBLE_HEIGHT_CM``, ``PLAUSIBLE_WEIGHT_KG``)."""
    if height_cm is None or weight_kg is None:
        return None
    if not (PLAUSIBLE_HEIGHT_CM[0] <= height_cm <= PLAUSIBLE_HEIGHT_CM[1]
            and PLAUSIBLE_WEIGHT_KG[0] <= weight_kg <= PLAUSIBLE_WEIGHT_KG[1]):  # NaN fails too
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
                    weight_kg: float | None = None, es_excess_ml: dict[str, float] | None = None) -> dict[str, float]:
    """Clinical indices of one patient from its ED and ES label volumes (``spacing_zyx`` in mm):
    EDV, ESV, SV (mL), EF (%) of LV and RV; LV myocardial mass at ED (g); ED mid-ventricular wall
    thickness (mm); with height and weight, BSA (m²) and the volumes and mass indexed by it
    (``*_per_m2``: mL/m², g/m²). Also, for features: the ES myocardial volume (mL), the ES wall
    thickness (mm) and the systolic wall thickening (%). ``es_excess_ml`` (structure → mL, from
    ``basal_es_excess``) is taken off the ES volumes first."""
    zooms_xyz = tuple(float(s) for s in spacing_zyx)[::-1]
    ed, es = volumes_ml(ed_zyx, zooms_xyz), volumes_ml(es_zyx, zooms_xyz)
    for name, ml in (es_excess_ml or {}).items():
        es[name] = max(es[name] - ml, 0.0)
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
