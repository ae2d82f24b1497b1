"""ACDC diagnosis (task 2): NOR / MINF / DCM / HCM / RV from segmentation-derived features.

    python -m raysegment.diagnosis crossval-masks --data /tmp/shards --folds 5 --minutes 6 --out /tmp/cv
    python -m raysegment.diagnosis fit --data /tmp/shards --masks /tmp/cv --out diagnosis.json

The classifier learns from features of the segmenter's own predicted masks: each patient's masks
come from a segmenter trained without that patient (``crossval-masks``: k folds stratified by
group), so the classifier sees the segmenter's errors as they will be on new patients.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from raysegment.data.prepare import Volume

GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
# Segmentation-derived features (``clinical.patient_indices`` keys, and ratios of them).
FEATURES = ("lv_ef_pct", "rv_ef_pct", "lv_edv_ml_per_m2", "lv_esv_ml_per_m2", "rv_edv_ml_per_m2", "rv_esv_ml_per_m2",
            "lv_mass_g_per_m2", "mass_to_lv_edv", "rv_to_lv_edv", "myo_thickness_max_mm", "myo_thickness_mean_mm",
            "myo_thickness_sd_mm", "myo_es_thickness_max_mm", "myo_es_thickness_mean_mm", "myo_es_thickness_sd_mm",
            "myo_thickening_pct")
# The ``clinical.patient_indices`` keys ``features`` reads; the per-m² ones and ``bsa_m2`` may be NaN (unknown).
INDEX_KEYS = ("lv_edv_ml", "lv_esv_ml", "rv_edv_ml", "rv_esv_ml", "lv_mass_g",
              *(f for f in FEATURES if not f.endswith("_per_m2") and f not in ("mass_to_lv_edv", "rv_to_lv_edv")))
FORMAT = "raysegment-diagnosis/2"  # /2 adds ``bsa_m2``; a /1 file reads as before (no BSA fill)
READS = (FORMAT, "raysegment-diagnosis/1")
SHIPPED = Path(__file__).parents[1] / "shipped" / "diagnosis.json"


def features(indices: dict, bsa_m2: float | None = None) -> np.ndarray:
    """The ``FEATURES`` vector of one patient from its ``clinical.patient_indices`` (NaN where unknown).
    A patient without height or weight (its indices' ``bsa_m2`` NaN) has its volumes (mL) and mass (g)
    indexed by ``bsa_m2`` (m²; a model's training median), else they stay NaN."""
    if bsa_m2 and not np.isfinite(indices.get("bsa_m2", np.nan)):
        indices = indices | {f: indices[f.removesuffix("_per_m2")] / bsa_m2 for f in FEATURES if f.endswith("_per_m2")}
    ratios = {"mass_to_lv_edv": indices["lv_mass_g"] / indices["lv_edv_ml"] if indices["lv_edv_ml"] > 0 else np.nan,
              "rv_to_lv_edv": indices["rv_edv_ml"] / indices["lv_edv_ml"] if indices["lv_edv_ml"] > 0 else np.nan}
    return np.array([ratios[f] if f in ratios else indices[f] for f in FEATURES], float)


@dataclass(frozen=True)
class DiagnosisModel:
    """A fitted classifier as plain numbers (JSON; nothing unpickled): features standardised, the
    soft vote of a multinomial logistic regression and a random forest. NaN features take the
    training median; a patient without height or weight is indexed by the training patients' median
    BSA (``bsa_m2``), since the median of each indexed volume would contradict its own volumes."""

    classes: tuple[str, ...]
    fill: tuple[float, ...]  # training medians (0 for a feature no training patient had)
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[tuple[float, ...], ...]  # (classes, features)
    intercept: tuple[float, ...]
    trees: tuple[dict, ...]  # left, right, feature, threshold, value (class shares per node)
    meta: dict = field(default_factory=dict)  # accuracy, cross-validation, segmenter, data
    basal_rv: dict | None = None  # the basal ES check (``clinical.checked_indices``) the indices and features use
    bsa_m2: float | None = None  # the training patients' median BSA (m²), for a patient without height or weight

    def features(self, indices: dict) -> np.ndarray:
        """This model's ``FEATURES`` row of one patient's ``clinical.patient_indices``."""
        return features(indices, self.bsa_m2)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) of feature rows (N, FEATURES)."""
        x = np.atleast_2d(np.asarray(x, float))
        x = np.where(np.isfinite(x), x, np.asarray(self.fill))
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        logits = z @ np.asarray(self.coef).T + np.asarray(self.intercept)
        logits -= logits.max(1, keepdims=True)
        p_lr = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        p_rf = np.mean([_tree_proba(t, x) for t in self.trees], axis=0)
        return (p_lr + p_rf) / 2

    def predict(self, x: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(x).argmax(1)]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "features": FEATURES, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> "DiagnosisModel":
        d = json.loads(text)
        if d.pop("format", None) not in READS:
            raise ValueError(f"not a {' or '.join(READS)} file (written by a newer raysegment?)")
        if tuple(d.pop("features")) != FEATURES:
            raise ValueError("written for other features than this raysegment computes")
        return cls(**{k: tuple(map(tuple, v)) if k == "coef" else tuple(v) if isinstance(v, list) else v
                      for k, v in d.items()})


def _tree_proba(tree: dict, x: np.ndarray) -> np.ndarray:
    left, right, feat, thr = (np.asarray(tree[k]) for k in ("left", "right", "feature", "threshold"))
    node = np.zeros(len(x), int)
    while True:
        inner = left[node] >= 0
        if not inner.any():
            break
        i = np.nonzero(inner)[0]
        go_left = x[i, feat[node[i]]] <= thr[node[i]]
        node[i] = np.where(go_left, left[node[i]], right[node[i]])
    return np.asarray(tree["value"])[node]


def _sklearn_models(seed: int):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=5000), RandomForestClassifier(n_estimators=300, random_state=seed)


def fit(x: np.ndarray, y: list[str], seed: int = 0, meta: dict | None = None, bsa_m2: float | None = None) -> DiagnosisModel:
    """Fit the classifier on feature rows ``x`` (N, FEATURES) and groups ``y``; ``bsa_m2``: see
    ``DiagnosisModel`` (``median_bsa_m2``)."""
    x, y = np.asarray(x, float), np.asarray(y)
    classes = tuple(g for g in GROUPS if g in set(y)) + tuple(sorted(set(y) - set(GROUPS)))
    fill = np.zeros(x.shape[1])  # a feature no patient has (a structure never drawn): 0, no information
    known = np.isfinite(x).any(0)
    fill[known] = np.nanmedian(np.where(np.isfinite(x[:, known]), x[:, known], np.nan), axis=0)
    x = np.where(np.isfinite(x), x, fill)
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    lr, rf = _sklearn_models(seed)
    lr.fit((x - mean) / scale, y)
    rf.fit(x, y)
    order_lr = [list(lr.classes_).index(c) for c in classes]
    order_rf = [list(rf.classes_).index(c) for c in classes]
    trees = []
    for est in rf.estimators_:
        t = est.tree_
        value = t.value[:, 0, :] / t.value[:, 0, :].sum(1, keepdims=True)
        trees.append({"left": t.children_left.tolist(), "right": t.children_right.tolist(), "feature": t.feature.tolist(),
                      "threshold": t.threshold.tolist(), "value": np.round(value[:, order_rf], 6).tolist()})
    return DiagnosisModel(classes=classes, fill=tuple(fill.tolist()), mean=tuple(mean.tolist()), scale=tuple(scale.tolist()),
                          coef=tuple(tuple(r) for r in lr.coef_[order_lr].tolist()),
                          intercept=tuple(lr.intercept_[order_lr].tolist()), trees=tuple(trees), meta=meta or {},
                          bsa_m2=bsa_m2)


def median_bsa_m2(names: list[str], patients: dict) -> float | None:
    """The median body surface area (m²) of the ``names`` whose manifest metadata (``patients``) has
    height and weight; None when none has."""
    from raysegment.analysis.clinical import body_surface_area_m2

    bsa = [body_surface_area_m2(patients.get(n, {}).get("height_cm"), patients.get(n, {}).get("weight_kg")) for n in names]
    known = [b for b in bsa if b is not None and np.isfinite(b)]
    return round(float(np.median(known)), 4) if known else None


def cross_validate(x: np.ndarray, y: list[str], folds: int = 5, repeats: int = 10, seed: int = 0) -> dict:
    """Repeated stratified k-fold accuracy of ``fit`` (mean, SD over the repeats' accuracies) and the
    confusion matrix summed over the repeats (rows: true group, columns: predicted; ``classes`` order)."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    x, y = np.asarray(x, float), np.asarray(y)
    classes = [g for g in GROUPS if g in set(y)]
    confusion = np.zeros((len(classes), len(classes)), int)
    per_repeat = np.zeros(repeats)
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    for i, (tr, te) in enumerate(splitter.split(x, y)):
        model = fit(x[tr], y[tr].tolist(), seed=seed)
        pred = model.predict(x[te])
        per_repeat[i // folds] += sum(p == t for p, t in zip(pred, y[te])) / len(y)
        for p, t in zip(pred, y[te]):
            confusion[classes.index(t), classes.index(p)] += 1
    return {"accuracy": float(per_repeat.mean()), "accuracy_sd": float(per_repeat.std()), "folds": folds,
            "repeats": repeats, "per_repeat": per_repeat.round(4).tolist(), "classes": classes,
            "confusion": confusion.tolist(), "n": int(len(y))}


def confusion_markdown(cv: dict) -> str:
    lines = ["| true \\ predicted | " + " | ".join(cv["classes"]) + " | recall |",
             "|---" * (len(cv["classes"]) + 2) + "|"]
    for c, row in zip(cv["classes"], cv["confusion"]):
        lines.append(f"| {c} | " + " | ".join(map(str, row)) + f" | {row[cv['classes'].index(c)] / max(sum(row), 1):.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- cross-validated masks


def fold_of(groups: dict[str, str], folds: int, seed: int = 0) -> dict[str, int]:
    """Patient → fold (0..folds-1), stratified by group (``raysegment.data.splits``)."""
    from raysegment.data.splits import stratified_folds

    return stratified_folds(groups, folds, seed)


def load_crossval_masks(folder: Path, volumes: list[Volume], config=None) -> dict[tuple[str, str], np.ndarray]:
    """(patient, phase) → predicted mask of ``volumes`` from a ``crossval-masks`` folder (every
    ``fold*.npz``), post-processed as the Predictor does (``config``: a ``PredictConfig``; largest
    components, the RV contact distance in mm from each volume's spacing)."""
    from raysegment.analysis.postprocess import contact_pixels, keep_largest_component
    from raysegment.config import PredictConfig

    config = config or PredictConfig()
    spacing = {(v.patient, v.phase): v.spacing for v in volumes}
    files = sorted(Path(folder).glob("fold*.npz"))
    if not files:
        raise FileNotFoundError(f"{folder}: no fold*.npz (written by `python -m raysegment.diagnosis crossval-masks`)")
    masks = {}
    for f in files:
        with np.load(f) as z:
            for key in z.files:
                patient, phase = key.split("/")
                if (patient, phase) in spacing:
                    m = z[key]
                    if config.largest_component:
                        m = keep_largest_component(m, contact_pixels(config, spacing[(patient, phase)]))
                    masks[(patient, phase)] = m
    return masks


def basal_slice_rows(volumes: list[Volume], mask_sets: list[dict], patients: set[str]) -> dict[str, tuple]:
    """Training rows of the ``basal-es/2`` check: the slices of ``clinical.basal_walk`` in each mask
    set's ES volumes of ``patients``, per model ("rv", "heart"): (features (N, SLICE_FEATURES), the
    reference leaves the structure out there (N,), patients (N,))."""
    from raysegment.analysis.clinical import BASAL_MODELS, SLICE_FEATURES, basal_walk, base_first

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
    """Fit ``clinical.basal_es_excess``'s check (format ``basal-es/2``) on the basal ES slices of
    ``patients`` in every mask set (one segmenter's masks each: pooling several makes it hold for
    each of them): per structure a logistic regression of "the reference leaves it out here". A
    structure whose slices are all of one kind gets no model (nothing to learn); None when neither has one."""
    from sklearn.linear_model import LogisticRegression

    from raysegment.analysis.clinical import BASAL_ES_FORMAT, SLICE_FEATURES

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
    manifest's metadata (height, weight); ``basal_rv``: the basal ES check (``clinical.checked_indices``)."""
    from raysegment.analysis.clinical import checked_indices

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
    from raysegment.analysis.clinical import agreement, patient_indices

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
    (``clinical.BASAL_ES_SLICES``) where the reference has none: what a perfect basal check does."""
    from raysegment.analysis.clinical import BASAL_ES_SLICES, BASAL_MODELS, base_first

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
    from raysegment.analysis.clinical import base_first
    from raysegment.config import CLASS_NAMES

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


def patient_features(volumes: list[Volume], masks: dict, patients: dict, basal_rv: dict | None = None,
                     bsa_m2: float | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(patients, feature rows, groups) of ``predicted_indices`` (``bsa_m2``: see ``features``)."""
    names, rows, groups = [], [], []
    for ed, _, ind, _ in predicted_indices(volumes, masks, patients, basal_rv):
        names.append(ed.patient)
        rows.append(features(ind, bsa_m2))
        groups.append(ed.group)
    return names, np.array(rows), groups


def misdiagnosed(names: list[str], truth: list[str], pred) -> list[str]:
    """"patient TRUE→PREDICTED" for each patient whose predicted group is wrong."""
    return [f"{n} {g}→{p}" for n, g, p in zip(names, truth, pred) if p != g]


def load(ref: str | Path, tracking_uri: str | None = None) -> DiagnosisModel:
    """A diagnosis model from a JSON file, ``shipped`` (``raysegment/shipped/diagnosis.json``) or a
    registry URI (``models:/raysegment-diagnosis@champion``)."""
    if str(ref) == "shipped":
        ref = SHIPPED
    if str(ref).startswith("models:/"):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:  # MLflow's own temp folder would stay behind
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{ref}/artifacts/diagnosis.json", dst_path=tmp)
            return DiagnosisModel.from_json(Path(path).read_text())
    return DiagnosisModel.from_json(Path(ref).read_text())


# --------------------------------------------------------------------------- CLI


def basal_table(records: list[dict]) -> str:
    """Markdown of ``basal_check_agreement``'s records."""
    lines = ["| masks | check | split | n | RV EF MAE / bias (%) | LV EF MAE / bias (%) | RV ESV MAE / bias (mL) "
             "| LV ESV MAE / bias (mL) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        cells = [f"{r[k + '_mae']:.2f} / {r[k + '_bias']:+.2f}" for k in ("rv_ef_pct", "lv_ef_pct", "rv_esv_ml", "lv_esv_ml")]
        lines.append(f"| {r['masks']} | {r['check']} | {r['split']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
