"""ACDC diagnosis (task 2): NOR / MINF / DCM / HCM / RV from segmentation-derived features.

    python -m raysegment.diagnosis crossval-masks --data /tmp/shards --folds 5 --minutes 6 --out /tmp/cv
    python -m raysegment.diagnosis fit --data /tmp/shards --masks /tmp/cv --out diagnosis.json

The classifier learns from features of the segmenter's own predicted masks: each patient's masks
come from a segmenter trained without that patient (``crossval-masks``: k folds stratified by
group), so the classifier sees the segmenter's errors as they will be on new patients.

Imports ``analysis`` (``basal``, ``clinical``, ``postprocess``), ``data`` and ``config``; nothing above ``analysis``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from raysegment.analysis.basal import predicted_indices
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
    A per-m² value that is missing or NaN is the volume (mL) or mass (g) over the patient's own
    ``bsa_m2`` (m²) where it is known, else over ``bsa_m2`` (a model's training median), else NaN."""
    own = float(indices.get("bsa_m2", np.nan))
    bsa = own if np.isfinite(own) and own > 0 else bsa_m2
    if bsa:
        indices = indices | {f: indices[f.removesuffix("_per_m2")] / bsa for f in FEATURES
                             if f.endswith("_per_m2") and not np.isfinite(indices.get(f, np.nan))}
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
    basal_rv: dict | None = None  # the basal ES check (``basal.checked_indices``) the indices and features use
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


