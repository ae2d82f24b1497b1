"""ACDC diagnosis (task 2): NOR / MINF / DCM / HCM / RV from segmentation-derived features.

    python -m raysegment.diagnosis crossval-masks --data /tmp/shards --folds 5 --minutes 6 --out /tmp/cv
    python -m raysegment.diagnosis fit --data /tmp/shards --masks /tmp/cv --out diagnosis.json

The classifier learns from features of the segmenter's own predicted masks: each patient's masks
come from a segmenter trained without that patient (``crossval-masks``: k folds stratified by
group), so the classifier sees the segmenter's errors as they will be on new patients.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from raysegment.prepare import Volume

GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
# Segmentation-derived features (``clinical.patient_indices`` keys, and ratios of them).
FEATURES = ("lv_ef_pct", "rv_ef_pct", "lv_edv_ml_per_m2", "lv_esv_ml_per_m2", "rv_edv_ml_per_m2", "rv_esv_ml_per_m2",
            "lv_mass_g_per_m2", "mass_to_lv_edv", "rv_to_lv_edv", "myo_thickness_max_mm", "myo_thickness_mean_mm",
            "myo_thickness_sd_mm", "myo_es_thickness_max_mm", "myo_es_thickness_mean_mm", "myo_es_thickness_sd_mm",
            "myo_thickening_pct")
FORMAT = "raysegment-diagnosis/1"
SHIPPED = Path(__file__).with_name("shipped") / "diagnosis.json"


def features(indices: dict) -> np.ndarray:
    """The ``FEATURES`` vector of one patient from its ``clinical.patient_indices`` (NaN where unknown,
    e.g. the indexed volumes without height and weight)."""
    ratios = {"mass_to_lv_edv": indices["lv_mass_g"] / indices["lv_edv_ml"] if indices["lv_edv_ml"] > 0 else np.nan,
              "rv_to_lv_edv": indices["rv_edv_ml"] / indices["lv_edv_ml"] if indices["lv_edv_ml"] > 0 else np.nan}
    return np.array([ratios[f] if f in ratios else indices[f] for f in FEATURES], float)


@dataclass(frozen=True)
class DiagnosisModel:
    """A fitted classifier as plain numbers (JSON; nothing unpickled): features standardised, the
    soft vote of a multinomial logistic regression and a random forest. NaN features (no height or
    weight) take the training median."""

    classes: tuple[str, ...]
    fill: tuple[float, ...]  # training medians
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[tuple[float, ...], ...]  # (classes, features)
    intercept: tuple[float, ...]
    trees: tuple[dict, ...]  # left, right, feature, threshold, value (class shares per node)
    meta: dict = field(default_factory=dict)  # accuracy, cross-validation, segmenter, data
    basal_rv: dict | None = None  # the basal ES check (``clinical.checked_indices``) the indices and features use

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
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
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


def fit(x: np.ndarray, y: list[str], seed: int = 0, meta: dict | None = None) -> DiagnosisModel:
    """Fit the classifier on feature rows ``x`` (N, FEATURES) and groups ``y``."""
    x, y = np.asarray(x, float), np.asarray(y)
    classes = tuple(g for g in GROUPS if g in set(y)) + tuple(sorted(set(y) - set(GROUPS)))
    fill = np.nanmedian(x, axis=0)
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
                          intercept=tuple(lr.intercept_[order_lr].tolist()), trees=tuple(trees), meta=meta or {})


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
    """Patient → fold (0..folds-1), stratified: each group's patients dealt round-robin in a seeded order."""
    rng = np.random.default_rng(seed)
    out: dict[str, int] = {}
    offset = 0
    for group in sorted(set(groups.values())):
        members = sorted(p for p, g in groups.items() if g == group)
        for i, p in enumerate(rng.permutation(members).tolist()):
            out[p] = (i + offset) % folds
        offset += len(members)  # the next group starts where this one stopped: folds stay balanced
    return out


def all_volumes(data: str | Path) -> list[Volume]:
    """Every labelled volume of a shards folder (both splits) or of a ``pack`` bundle (.npz)."""
    data = Path(data)
    if data.suffix == ".npz":
        return load_bundle(data)
    from raysegment.dataset import load_volumes

    return load_volumes(data, "train") + load_volumes(data, "val")


def save_bundle(volumes: list[Volume], path: Path) -> None:
    """Volumes in one compressed .npz, images quantised to 8 bits of their normalised [0, 1] range
    (an error ≤ 0.002, a tenth of the training noise): to carry the data to a GPU machine."""
    arrays, meta = {}, []
    for i, v in enumerate(volumes):
        arrays[f"image{i}"] = np.round(np.clip(v.image, 0, 1) * 255).astype(np.uint8)
        arrays[f"label{i}"] = v.label
        meta.append({"patient": v.patient, "phase": v.phase, "spacing": v.spacing, "group": v.group})
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)


def load_bundle(path: Path) -> list[Volume]:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return [Volume(m["patient"], m["phase"], z[f"image{i}"].astype(np.float32) / 255, z[f"label{i}"],
                       tuple(m["spacing"]) if m["spacing"] else None, m["group"], source=str(path))
                for i, m in enumerate(meta)]


def crossval_fold(volumes: list[Volume], fold: int, folds: int, config, device: str, out: Path, seed: int = 0) -> dict:
    """Train a segmenter on every patient outside ``fold`` and segment the patients inside it.

    Writes ``fold{K}.npz`` (raw argmax masks, key ``patient/phase``: post-processing is left to the
    reader, who knows the true spacing) and ``fold{K}.json`` (patients, history, config)."""
    import torch

    from raysegment.checkpoint import LoadedModel
    from raysegment.config import PredictConfig
    from raysegment.predict import Predictor
    from raysegment.train import fit_local

    folds_of = fold_of({v.patient: v.group for v in volumes}, folds, seed)
    held = sorted({p for p, f in folds_of.items() if f == fold})
    train = [v for v in volumes if folds_of[v.patient] != fold]
    t0 = time.perf_counter()
    model, history = fit_local(config, train, device,
                               log=lambda line: print(f"fold {fold}: {line}", file=sys.stderr, flush=True))
    predictor = Predictor(LoadedModel(model, config, f"crossval-fold{fold}"),
                          PredictConfig(device=device, precision=config.precision, largest_component=False))
    masks = {}
    with torch.no_grad():
        for v in volumes:
            if v.patient in held:
                masks[f"{v.patient}/{v.phase}"] = predictor.predict(v.image, spacing=v.spacing, normalized=True)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"fold{fold}.npz", **masks)
    summary = {"fold": fold, "folds": folds, "seed": seed, "patients": held, "train_patients": len({v.patient for v in train}),
               "minutes": round((time.perf_counter() - t0) / 60, 2), "history": history, "config": config.to_dict()}
    (out / f"fold{fold}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def load_crossval_masks(folder: Path, volumes: list[Volume], config=None) -> dict[tuple[str, str], np.ndarray]:
    """(patient, phase) → predicted mask of ``volumes`` from a ``crossval-masks`` folder (every
    ``fold*.npz``), post-processed as the Predictor does (``config``: a ``PredictConfig``; largest
    components, the RV contact distance in mm from each volume's spacing)."""
    from raysegment.config import PredictConfig
    from raysegment.predict import contact_pixels, keep_largest_component

    config = config or PredictConfig()
    spacing = {(v.patient, v.phase): v.spacing for v in volumes}
    files = sorted(Path(folder).glob("fold*.npz"))
    if not files:
        raise FileNotFoundError(f"{folder}: no fold*.npz (written by `raysegment.diagnosis crossval-masks`)")
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
    from raysegment.clinical import BASAL_MODELS, SLICE_FEATURES, base_first, basal_walk

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

    from raysegment.clinical import BASAL_ES_FORMAT, SLICE_FEATURES

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
    from raysegment.clinical import checked_indices

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
    from raysegment.clinical import agreement, patient_indices

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
    from raysegment.clinical import BASAL_ES_SLICES, BASAL_MODELS, base_first

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
    from raysegment import CLASS_NAMES
    from raysegment.clinical import base_first

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


def patient_features(volumes: list[Volume], masks: dict, patients: dict,
                     basal_rv: dict | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(patients, feature rows, groups) of ``predicted_indices``."""
    names, rows, groups = [], [], []
    for ed, _, ind, _ in predicted_indices(volumes, masks, patients, basal_rv):
        names.append(ed.patient)
        rows.append(features(ind))
        groups.append(ed.group)
    return names, np.array(rows), groups


def load(ref: str | Path, tracking_uri: str | None = None) -> DiagnosisModel:
    """A diagnosis model from a JSON file, ``shipped`` (``raysegment/shipped/diagnosis.json``) or a
    registry URI (``models:/raysegment-diagnosis@champion``)."""
    if str(ref) == "shipped":
        ref = SHIPPED
    if str(ref).startswith("models:/"):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        folder = mlflow.artifacts.download_artifacts(artifact_uri=f"{ref}/artifacts/diagnosis.json")
        ref = folder
    return DiagnosisModel.from_json(Path(ref).read_text())


# --------------------------------------------------------------------------- CLI


def _fit_command(a) -> int:
    from raysegment.prepare import load_manifest

    manifest = load_manifest(a.data)
    volumes = all_volumes(a.data)
    masks = load_crossval_masks(a.masks, volumes)
    # The basal check learns from the train split only, so val keeps measuring it on unseen patients.
    basal = fit_basal_check(volumes, masks, set(manifest["splits"]["train"]), seed=a.seed)
    names, x, y = patient_features(volumes, masks, manifest.get("patients", {}), basal)
    if len(set(y)) < 2 or len(names) < 10:
        print(f"error: {len(names)} patients with ED and ES masks, groups {sorted(set(y))}: too few to fit", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    cv = cross_validate(x, y, repeats=a.repeats, seed=a.seed)
    meta = {"accuracy": cv["accuracy"], "accuracy_sd": cv["accuracy_sd"], "cv": cv, "segmenter": a.segmenter,
            "patients": len(names), "manifest_hash": manifest.get("content_hash", ""), "masks": str(a.masks)}
    model = replace(fit(x, y, seed=a.seed, meta=meta), basal_rv=basal)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(model.to_json() + "\n")
    table = confusion_markdown(cv)
    summary = (f"Diagnosis from predicted masks: {cv['folds']}-fold stratified CV × {cv['repeats']} on {cv['n']} patients, "
               f"accuracy {cv['accuracy']:.3f} ± {cv['accuracy_sd']:.3f} (SD over repeats); confusion summed over repeats:")
    a.out.with_suffix(".md").write_text(summary + "\n\n" + table + "\n")
    with open(a.out.with_suffix(".features.csv"), "w") as f:
        f.write(",".join(("patient", "group") + FEATURES) + "\n")
        for n, g, row in zip(names, y, x):
            f.write(",".join([n, g] + [f"{v:.4g}" for v in row]) + "\n")
    print(summary)
    print(table)
    print(f"wrote {a.out} ({time.perf_counter() - t0:.0f} s); register it with "
          f"`python -m raysegment.registry diagnosis {a.out} --mlflow-uri URI`")
    return 0


def basal_table(records: list[dict]) -> str:
    """Markdown of ``basal_check_agreement``'s records."""
    lines = ["| masks | check | split | n | RV EF MAE / bias (%) | LV EF MAE / bias (%) | RV ESV MAE / bias (mL) | LV ESV MAE / bias (mL) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        cells = [f"{r[k + '_mae']:.2f} / {r[k + '_bias']:+.2f}" for k in ("rv_ef_pct", "lv_ef_pct", "rv_esv_ml", "lv_esv_ml")]
        lines.append(f"| {r['masks']} | {r['check']} | {r['split']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _basal_command(a) -> int:
    from raysegment.config import PredictConfig
    from raysegment.predict import Predictor, predicted_masks
    from raysegment.prepare import load_manifest

    manifest = load_manifest(a.data)
    volumes = [v for v in all_volumes(a.data) if v.spacing is not None]
    if not volumes:
        print(f"error: {a.data}: no volumes with spacing (re-run raysegment.prepare beside info.csv / with NIfTI headers)",
              file=sys.stderr)
        return 2
    current = load(a.diagnosis, a.mlflow_uri)
    predictors = {ref: Predictor.load(ref, PredictConfig(), a.mlflow_uri) for ref in a.model}
    if a.ensemble and len(a.model) > 1:
        flips = all(m.config.augment.flip_prob > 0 for p in predictors.values() for m in p.members)
        predictors[" + ".join(a.model) + (" (flip TTA)" if flips else "")] = Predictor.load(
            a.model, PredictConfig(flip_tta=flips), a.mlflow_uri)
    mask_sets = {}
    for name, predictor in predictors.items():
        t0 = time.perf_counter()
        mask_sets[name] = predicted_masks(predictor, volumes)
        print(f"{name}: {len(volumes)} volumes segmented in {time.perf_counter() - t0:.0f} s", flush=True)
    train, val = set(manifest["splits"]["train"]), set(manifest["splits"].get("val", []))
    where = ["Mean predicted − reference ES volume (mL) per slice from the base (train split):",
             "| masks | structure | slice 0 | 1 | 2 | 3 | below |", "|---|---|---|---|---|---|---|"]
    for name, masks in mask_sets.items():
        for structure, row in excess_by_slice(volumes, masks, train).items():
            where.append(f"| {name} | {structure} | " + " | ".join(f"{x:+.2f}" for x in row) + " |")
    print("\n".join(where), flush=True)
    records, check = basal_check_agreement(volumes, mask_sets, {"none": None, f"{a.diagnosis}'s": current.basal_rv},
                                           train, val, seed=a.seed)
    if check is None:
        print("error: the train split's basal ES slices are all of one kind: nothing to fit", file=sys.stderr)
        return 2
    check["segmenters"] = list(mask_sets)
    check["manifest_hash"] = manifest.get("content_hash", "")
    model = replace(current, basal_rv=check)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(model.to_json() + "\n")
    table = basal_table(records)
    head = (f"Basal ES check fitted on the masks of {', '.join(mask_sets)} on {len(train)} train patients; "
            f"train rows: patient-grouped 5-fold CV; val rows: the check fitted on every train patient.")
    a.out.with_suffix(".basal.md").write_text(head + "\n\n" + table + "\n\n" + "\n".join(where) + "\n")
    print(head)
    print(table)
    print(f"wrote {a.out} (the classifier of {a.diagnosis} with this check) and {a.out.with_suffix('.basal.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from raysegment.config import TrainConfig, default_of

    p = argparse.ArgumentParser(prog="python -m raysegment.diagnosis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    cv = sub.add_parser("crossval-masks", help="train one segmenter per fold, segment its held-out patients")
    cv.add_argument("--data", required=True, help="shards folder (both splits are used) or a `pack` bundle .npz")
    cv.add_argument("--out", required=True, type=Path, help="folder for fold{K}.npz / fold{K}.json")
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--fold", type=int, action="append", help="only these folds (repeat; default: all, one after another)")
    cv.add_argument("--backbone", default="mobilenet_v2")
    cv.add_argument("--minutes", type=float, default=10.0, help="wall-time budget of each fold's training (min)")
    cv.add_argument("--epochs", type=int, default=200, help="most epochs per fold")
    cv.add_argument("--batch-size", type=int, default=default_of(TrainConfig, "batch_size"))
    cv.add_argument("--context-slices", type=int, default=0, choices=[0, 1], help="1: 2.5-D input (slices k-1, k, k+1)")
    cv.add_argument("--max-steps", type=int, default=None, help="steps per epoch at most (smoke tests)")
    cv.add_argument("--device", default="cpu")
    cv.add_argument("--seed", type=int, default=0)
    ft = sub.add_parser("fit", help="features of cross-validated masks → repeated CV accuracy, the fitted model (JSON)")
    ft.add_argument("--data", required=True, help="the shards the masks were made from (spacing, height, weight)")
    ft.add_argument("--masks", required=True, type=Path, help="a `crossval-masks` folder")
    ft.add_argument("--out", required=True, type=Path, help="the model's JSON file (beside it: FILE.md, FILE.features.csv)")
    ft.add_argument("--segmenter", default="", help="what made the masks, recorded with the model (e.g. a model version)")
    ft.add_argument("--repeats", type=int, default=10)
    ft.add_argument("--seed", type=int, default=0)
    bs = sub.add_parser("basal", help="fit the basal ES check on segmenters' own masks of the train split, compare it "
                                      "(patient-grouped CV on train, then val) and write it into a diagnosis model")
    bs.add_argument("--data", required=True, help="shards with spacing (both splits are segmented)")
    bs.add_argument("--model", action="append", required=True, help="a segmenter (repeat: each one's masks are pooled)")
    bs.add_argument("--ensemble", action="store_true",
                    help="also pool the masks of all --model together (softmax averaged, flip TTA where every member allows it)")
    bs.add_argument("--diagnosis", default="shipped", help="the diagnosis model whose check is compared and replaced")
    bs.add_argument("--out", required=True, type=Path, help="the diagnosis JSON to write (beside it: FILE.basal.md)")
    bs.add_argument("--mlflow-uri", default=None)
    bs.add_argument("--seed", type=int, default=0)
    pk = sub.add_parser("pack", help="shards → one compressed .npz of 8-bit volumes (to carry to a GPU machine)")
    pk.add_argument("--data", required=True)
    pk.add_argument("--out", required=True, type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.command == "pack":
        volumes = all_volumes(a.data)
        save_bundle(volumes, a.out)
        print(f"{len(volumes)} volumes → {a.out} ({a.out.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if a.command == "fit":
        return _fit_command(a)
    if a.command == "basal":
        return _basal_command(a)
    if a.command == "crossval-masks":
        from raysegment.config import ModelConfig, TrainConfig

        if a.folds < 2 or any(not 0 <= f < a.folds for f in a.fold or []):
            p.error(f"--folds must be ≥ 2 and every --fold in 0..{a.folds - 1}")
        volumes = all_volumes(a.data)
        config = TrainConfig(data=str(a.data), model=ModelConfig(backbone=a.backbone, context_slices=a.context_slices),
                             epochs=a.epochs, time_budget_min=a.minutes, batch_size=a.batch_size, seed=a.seed,
                             max_steps_per_epoch=a.max_steps)
        for fold in a.fold or range(a.folds):
            s = crossval_fold(volumes, fold, a.folds, config, a.device, a.out, seed=a.seed)
            print(f"fold {fold}: {len(s['patients'])} patients segmented after {len(s['history'])} epochs "
                  f"({s['minutes']:.1f} min)", flush=True)
        return 0
    return 2


if __name__ == "__main__":
    from raysegment.diagnosis import main as _main  # the importable module's main (pickling, as the other CLIs)

    sys.exit(_main())
