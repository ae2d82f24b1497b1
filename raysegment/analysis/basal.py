"""The basal ES check: the slices at the base of the ES stack that a segmenter marks as RV, LV or
myocardium where the reference leaves them out (the ventricle has moved below the slice), and the
expected excess (mL) taken off the ES volumes before the indices (``checked_indices``); fitting it
on a segmenter's masks (``fit_basal_check``) and scoring checks against the reference.

Imports ``analysis.clinical``, ``data`` and ``config``; nothing above ``analysis``.
"""

from __future__ import annotations

import math

import numpy as np

from raysegment.analysis.clinical import agreement, patient_indices
from raysegment.config import CLASS_NAMES
from raysegment.data.prepare import Volume

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
    ``basal-es/2``, fitted on training patients by ``fit_basal_check``).

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

# --------------------------------------------------------------------------- fitting and scoring a check


def basal_slice_rows(volumes: list[Volume], mask_sets: list[dict], patients: set[str]) -> dict[str, tuple]:
    """Training rows of the ``basal-es/2`` check: the slices of ``basal_walk`` in each mask
    set's ES volumes of ``patients``, per model ("rv", "heart"): (features (N, SLICE_FEATURES), the
    reference leaves the structure out there (N,), patients (N,))."""

    rows = {key: ([], [], []) for key in BASAL_MODELS}
    for v in volumes:
        if v.phase != "ES" or v.patient not in patients or v.spacing is None:
            continue
        for masks in mask_sets:
            if (v.patient, "ED") not in masks or (v.patient, "ES") not in masks:
                continue
            _, (ed, es, ref) = base_first(masks[(v.patient, "ED")], masks[(v.patient, "ES")], v.label)
            for key, labels in BASAL_MODELS.items():
                x, y, who = rows[key]
                for k, features, _ in basal_walk(ed, es, labels, v.spacing[0]):
                    x.append(features)
                    y.append(int(not (ref[k] == labels[0]).any()))
                    who.append(v.patient)
    return {k: (np.array(x).reshape(-1, len(SLICE_FEATURES)), np.array(y, int), np.array(who)) for k, (x, y, who) in rows.items()}


def fit_basal_check(volumes: list[Volume], mask_sets: dict | list[dict], patients: set[str], seed: int = 0) -> dict | None:
    """Fit ``basal_es_excess``'s check (format ``basal-es/2``) on the basal ES slices of
    ``patients`` in every mask set (one segmenter's masks each: pooling several makes it hold for
    each of them): per structure a logistic regression of "the reference leaves it out here". A
    structure whose slices are all of one kind gets no model (nothing to learn); None when neither has one."""
    from sklearn.linear_model import LogisticRegression


    mask_sets = [mask_sets] if isinstance(mask_sets, dict) else list(mask_sets)
    check = {"format": BASAL_ES_FORMAT, "features": list(SLICE_FEATURES), "patients": len(patients),
             "mask_sets": len(mask_sets)}
    for key, (x, y, _) in basal_slice_rows(volumes, mask_sets, patients).items():
        if len(set(y.tolist())) < 2:
            continue
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0
        lr = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit((x - mean) / scale, y)
        check[key] = {"mean": mean.tolist(), "scale": scale.tolist(), "coef": lr.coef_[0].tolist(),
                      "intercept": float(lr.intercept_[0]), "slices": int(len(y)), "left_out_in_reference": int(y.sum())}
    return check if "rv" in check or "heart" in check else None


def predicted_indices(volumes: list[Volume], masks: dict, patients: dict, basal_rv: dict | None = None):
    """Per patient (in order) with ED and ES masks and known spacing: (ED volume, ES volume,
    ``clinical.patient_indices`` of the masks, what the basal ES check did). ``patients`` is the
    manifest's metadata (height, weight); ``basal_rv``: the basal ES check (``checked_indices``)."""

    by_patient: dict[str, dict] = {}
    for v in volumes:
        by_patient.setdefault(v.patient, {})[v.phase] = v
    for patient, phases in sorted(by_patient.items()):
        if not all((patient, ph) in masks and ph in phases for ph in ("ED", "ES")) or phases["ED"].spacing is None:
            continue
        meta = patients.get(patient, {})
        ind, info = checked_indices(masks[(patient, "ED")], masks[(patient, "ES")], phases["ED"].spacing,
                                    meta.get("height_cm"), meta.get("weight_kg"), basal_rv)
        yield phases["ED"], phases["ES"], ind, info


ORACLE = "oracle (the reference's basal slices)"


def basal_check_agreement(volumes: list[Volume], mask_sets: dict[str, dict], checks: dict[str, dict | None],
                          train: set[str], val: set[str], folds: int = 5, seed: int = 0) -> tuple[list[dict], dict | None]:
    """How basal ES checks do, per mask set (name → masks of one segmenter): RV and LV EF (%) and
    ESV (mL) against the reference, with each of ``checks`` (name → check or None) and with a check
    fitted here on all mask sets — for the train patients by patient-grouped ``folds``-fold
    cross-validation (each patient scored by a check fitted without it), for the val patients fitted
    on every train patient. Returns (records, the check fitted on every train patient)."""

    ref = {ed.patient: patient_indices(ed.label, es.label, ed.spacing)
           for ed, es, _, _ in predicted_indices(volumes, {(v.patient, v.phase): v.label for v in volumes}, {})}
    order = np.random.default_rng(seed).permutation(sorted(train)).tolist()
    groups = [{p for i, p in enumerate(order) if i % folds == f} for f in range(folds)]
    full = fit_basal_check(volumes, list(mask_sets.values()), set(train), seed)
    # (patients, check) pairs that score each split: the fitted check is cross-validated on train.
    plans = {name: {"train": [(set(train), c)], "val": [(set(val), c)]} for name, c in checks.items()}
    plans["fitted here"] = {"train": [(g, fit_basal_check(volumes, list(mask_sets.values()), set(train) - g, seed)) for g in groups],
                            "val": [(set(val), full)]}
    # The most any basal check could give: the basal slices the reference leaves out, cleared.
    plans[ORACLE] = {"train": [(set(train), None)], "val": [(set(val), None)]}
    records = []
    for set_name, masks in mask_sets.items():
        for check_name, plan in plans.items():
            scored = reference_basal_masks(volumes, masks) if check_name == ORACLE else masks
            for split, parts in plan.items():
                got = [(ed.patient, ind) for patients, check in parts
                       for ed, _, ind, _ in predicted_indices([v for v in volumes if v.patient in patients], scored, {}, check)]
                records.append({"masks": set_name, "check": check_name, "split": split, "n": len(got),
                                **{f"{k}_{stat}": agreement([i[k] for _, i in got], [ref[p][k] for p, _ in got])[stat]
                                   for k in ("rv_ef_pct", "lv_ef_pct", "rv_esv_ml", "lv_esv_ml") for stat in ("mae", "bias")}})
    return records, full


def reference_basal_masks(volumes: list[Volume], masks: dict) -> dict:
    """``masks`` with the RV (LV cavity and myocardium) cleared on the basal ES slices
    (``BASAL_ES_SLICES``) where the reference has none: what a perfect basal check does."""

    out = dict(masks)
    for v in volumes:
        key = (v.patient, "ES")
        if v.phase != "ES" or key not in masks or (v.patient, "ED") not in masks:
            continue
        out[key] = masks[key].copy()
        _, (_, es, ref) = base_first(masks[(v.patient, "ED")], out[key], v.label)  # views: es writes into out[key]
        for k in range(min(BASAL_ES_SLICES, es.shape[0])):
            for labels in BASAL_MODELS.values():
                if not (ref[k] == labels[0]).any():
                    es[k][np.isin(es[k], labels)] = 0
    return out


def excess_by_slice(volumes: list[Volume], masks: dict, patients: set[str], positions: int = 4) -> dict[str, list[float]]:
    """Mean predicted − reference volume (mL) per ES slice position from the base (0 … ``positions``
    − 1, then every slice below together) of RV, MYO and LV, over ``patients``: where the ES excess lies."""

    sums = {name: np.zeros(positions + 1) for name in CLASS_NAMES.values()}
    counts = np.zeros(positions + 1)
    for v in volumes:
        if v.phase != "ES" or v.patient not in patients or (v.patient, "ES") not in masks or v.spacing is None:
            continue
        _, (_, es, ref) = base_first(masks[(v.patient, "ED")], masks[(v.patient, "ES")], v.label)
        voxel_ml = float(np.prod(v.spacing)) / 1000.0
        for k in range(es.shape[0]):
            pos = min(k, positions)
            counts[pos] += 1
            for lab, name in CLASS_NAMES.items():
                sums[name][pos] += (float((es[k] == lab).sum()) - float((ref[k] == lab).sum())) * voxel_ml
    return {name: (total / np.maximum(counts, 1)).round(2).tolist() for name, total in sums.items()}


def basal_table(records: list[dict]) -> str:
    """Markdown of ``basal_check_agreement``'s records."""
    lines = ["| masks | check | split | n | RV EF MAE / bias (%) | LV EF MAE / bias (%) | RV ESV MAE / bias (mL) "
             "| LV ESV MAE / bias (mL) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        cells = [f"{r[k + '_mae']:.2f} / {r[k + '_bias']:+.2f}" for k in ("rv_ef_pct", "lv_ef_pct", "rv_esv_ml", "lv_esv_ml")]
        lines.append(f"| {r['masks']} | {r['check']} | {r['split']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
