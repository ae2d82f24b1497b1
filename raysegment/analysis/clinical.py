"""Clinical indices from label volumes (mL, g, %) and plausibility checks (QC flags)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from raysegment.config import CLASS_NAMES

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
}


def patient_flags(ind: dict) -> list[str]:
    """The ``PATIENT_FLAGS`` that hold for a patient's indices: ``es_above_ed_<lv|rv>`` (an ES volume
    above the ED volume, mL), ``no_height_weight`` (a ``bsa_m2`` that is NaN)."""
    flags = [f"es_above_ed_{n}" for n in ("lv", "rv") if ind[f"{n}_esv_ml"] > ind[f"{n}_edv_ml"]]
    return flags + (["no_height_weight"] if "bsa_m2" in ind and not math.isfinite(ind["bsa_m2"]) else [])


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


def _logistic(model: dict, x: np.ndarray) -> float:
    z = (x - np.asarray(model["mean"])) / np.asarray(model["scale"])
    return 1.0 / (1.0 + math.exp(-(float(z @ np.asarray(model["coef"])) + model["intercept"])))


def base_at_end(ed_zyx: np.ndarray) -> bool:
    """Whether the stack runs from the apex: the heart's ED cross-section is larger in its second half
    (in every ACDC volume slice 0 is the base; a DICOM stack sorted along its normal may be reversed)."""
    areas = (ed_zyx > 0).reshape(ed_zyx.shape[0], -1).sum(1)
    half = len(areas) // 2
    return bool(areas[:half].sum() < areas[len(areas) - half:].sum())


def base_first(ed_zyx: np.ndarray, *others: np.ndarray) -> tuple[bool, list[np.ndarray]]:
    """(reversed?, [ed, *others] as views with the base at slice 0): reversed when ``base_at_end``."""
    flip = base_at_end(ed_zyx)
    return flip, [a[::-1] if flip else a for a in (ed_zyx, *others)]


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
    if base_at_end(ed_zyx):  # walk it reversed
        out, cleared = basal_rv_check(ed_zyx[::-1], es_zyx[::-1], check)
        n = es_zyx.shape[0]
        return (np.ascontiguousarray(out[::-1]) if cleared else es_zyx), sorted(n - 1 - k for k in cleared)
    out, cleared = es_zyx, []
    for k in range(min(BASAL_SLICES, es_zyx.shape[0] - 1)):
        if not (out[k] == 1).any():
            continue
        if _logistic(check, basal_rv_features(ed_zyx, out, k)) <= check["threshold"]:
            break
        if out is es_zyx:
            out = es_zyx.copy()
        out[k][out[k] == 1] = 0
        cleared.append(k)
    return out, cleared


# The check of ``basal_es_excess`` (format ``basal-es/2``): up to two logistic models on
# ``SLICE_FEATURES`` of each basal ES slice that has the structure: "rv" — the reference draws no RV
# there; "heart" — it draws no LV cavity there (the slice lies above the ventricles at end-systole).
BASAL_ES_FORMAT = "basal-es/2"
BASAL_ES_SLICES = 3  # 5-mm stacks lose up to three slices of RV between ED and ES (the 80 ACDC patients here)
SLICE_FEATURES = BASAL_FEATURES + ("slice_mm", "depth_mm", "lv_over_next_slice", "myo_es_over_ed", "myo_ring_es",
                                    "myo_ring_ed", "rv_ed_over_ed_max", "rv_over_es_max", "lv_over_es_max",
                                    "rv_ed_over_next_slice")


def myo_ring(labels_yx: np.ndarray) -> float:
    """Share of the LV cavity's outer border (pixels) that is myocardium: ≈1 in a closed ring,
    lower where the wall opens towards the outflow tract or atrium; 0 without cavity."""
    from scipy import ndimage

    lv = labels_yx == 3
    if not lv.any():
        return 0.0
    border = ndimage.binary_dilation(lv) & ~lv
    return float((labels_yx[border] == 2).mean())


def basal_slice_features(ed_zyx: np.ndarray, es_zyx: np.ndarray, k: int, slice_mm: float) -> np.ndarray:
    """``SLICE_FEATURES`` of ES slice ``k`` (0 = the base, ``k`` < slices − 1): ``basal_rv_features``,
    then the slice thickness and depth (mm), log area ratios (voxels) of LV cavity and myocardium
    against the next slice and ED, the myocardial ring's closure at ES and ED, and RV and LV areas
    against the largest slice of their phase."""
    def area(m, kk, lab):
        return float((m[kk] == lab).sum())

    def log(r):
        return math.log(r + 1e-3)

    def biggest(m, lab):
        return max(1.0, float((m == lab).reshape(m.shape[0], -1).sum(1).max()))

    rv, lv, rv_ed = area(es_zyx, k, 1), area(es_zyx, k, 3), area(ed_zyx, k, 1)
    more = [float(slice_mm), float(k * slice_mm), log(lv / max(area(es_zyx, k + 1, 3), 1)),
            log(area(es_zyx, k, 2) / max(area(ed_zyx, k, 2), 1)), myo_ring(es_zyx[k]), myo_ring(ed_zyx[k]),
            log(rv_ed / biggest(ed_zyx, 1)), log(rv / biggest(es_zyx, 1)), log(lv / biggest(es_zyx, 3)),
            log(rv_ed / max(area(ed_zyx, k + 1, 1), 1))]
    return np.concatenate([basal_rv_features(ed_zyx, es_zyx, k), more])


BASAL_MODELS = {"rv": (1,), "heart": (3, 2)}  # the check's models → the labels each one walks (the first decides)


def basal_walk(ed_zyx: np.ndarray, es_zyx: np.ndarray, labels: tuple[int, ...], slice_mm: float):
    """Yield (k, ``basal_slice_features``, voxels per label) for each of the top ``BASAL_ES_SLICES``
    ES slices (slice 0 = the base) that hold ``labels[0]``; after each, the slice's ``labels`` are
    cleared in a working copy, so the next slice is seen as it would be below a cleared one."""
    work = es_zyx.copy()
    for k in range(min(BASAL_ES_SLICES, es_zyx.shape[0] - 1)):
        if not (work[k] == labels[0]).any():
            continue  # nothing drawn here: the walk goes on below
        yield k, basal_slice_features(ed_zyx, work, k, slice_mm), {lab: float((work[k] == lab).sum()) for lab in labels}
        work[k][np.isin(work[k], labels)] = 0


def basal_es_excess(ed_zyx: np.ndarray, es_zyx: np.ndarray, spacing_zyx, check: dict) -> dict:
    """The expected excess (mL) of the ES volumes on the basal slices, under ``check`` (format
    ``basal-es/2``, fitted on training patients by ``diagnosis.fit_basal_check``).

    At end-systole the base moves towards the apex, so the top ES slices often cut the atria or the
    outflow tracts, which ACDC's reference leaves unlabelled, while a 2-D network labels them. For
    each structure the slices are walked from the base (``basal_walk``): a slice's RV (or LV cavity
    and myocardium) counts as excess with the probability that the reference leaves it out, times the
    probability that every slice above it was left out too (the reference never skips a slice and
    resumes). The expected value, not a 0/1 decision: a wrong decision costs a whole slice (15–30 mL
    in a large RV). Returns ``rv``/``lv``/``myo`` (mL, keys as ``volumes_ml``) and, per walked slice,
    ``p_no_rv`` / ``p_no_heart`` (slice index → probability) for the results."""
    n = es_zyx.shape[0]
    reverse, (ed_zyx, es_zyx) = base_first(ed_zyx, es_zyx)
    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
    out = {"rv": 0.0, "lv": 0.0, "myo": 0.0, "p_no_rv": {}, "p_no_heart": {}}
    for key, labels in BASAL_MODELS.items():
        if key not in check:  # nothing was learnt for this structure
            continue
        reach = 1.0
        for k, x, voxels in basal_walk(ed_zyx, es_zyx, labels, float(spacing_zyx[0])):
            q = _logistic(check[key], x)
            reach *= q
            out[f"p_no_{key}"][n - 1 - k if reverse else k] = round(q, 4)
            for lab, count in voxels.items():
                out[CLASS_NAMES[lab]] += reach * count * voxel_ml
    return out


def checked_indices(ed_zyx: np.ndarray, es_zyx: np.ndarray, spacing_zyx, height_cm: float | None = None,
                    weight_kg: float | None = None, check: dict | None = None) -> tuple[dict[str, float], dict]:
    """``patient_indices`` with a basal ES check applied first: a ``basal-es/2`` check takes its
    expected excess off the ES volumes; an older check (a ``basal_rv_check`` model) clears the RV
    of the slices it rejects. Returns (indices, what the check did: ``{structure}_es_basal_excess_ml``
    and the per-slice probabilities, for the results)."""
    if check is None:
        return patient_indices(ed_zyx, es_zyx, spacing_zyx, height_cm, weight_kg), {}
    if check.get("format") == BASAL_ES_FORMAT:
        excess = basal_es_excess(ed_zyx, es_zyx, spacing_zyx, check)
        ind = patient_indices(ed_zyx, es_zyx, spacing_zyx, height_cm, weight_kg,
                              es_excess_ml={k: excess[k] for k in ("rv", "lv", "myo")})
        info = {f"{k}_es_basal_excess_ml": round(excess[k], 3) for k in ("rv", "lv", "myo")}
        info |= {k: " ".join(f"{z}:{q}" for z, q in sorted(excess[k].items())) for k in ("p_no_rv", "p_no_heart")}
        return ind, info
    es, cleared = basal_rv_check(ed_zyx, es_zyx, check)
    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
    excess = float(((es_zyx == 1) & (es == 0)).sum()) * voxel_ml
    return patient_indices(ed_zyx, es, spacing_zyx, height_cm, weight_kg), \
        {"rv_es_basal_excess_ml": round(excess, 3), "rv_es_basal_slices_cleared": ",".join(map(str, cleared))}
