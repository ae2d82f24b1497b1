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
    basal_rv: dict | None = None  # the ES basal-slice RV check (``clinical.basal_rv_check``) the features used

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


def fit_basal_check(volumes: list[Volume], masks: dict, patients: set[str], seed: int = 0) -> dict | None:
    """Fit ``clinical.basal_rv_check``'s logistic model: for every basal ES slice (``BASAL_SLICES``) of
    ``patients`` where the predicted mask has RV, does the reference have none there? None when the
    slices are all of one kind (nothing to learn)."""
    from sklearn.linear_model import LogisticRegression

    from raysegment.clinical import BASAL_FEATURES, BASAL_SLICES, basal_rv_features

    x, y = [], []
    for v in volumes:
        if v.phase != "ES" or v.patient not in patients or (v.patient, "ED") not in masks:
            continue
        ed, es = masks[(v.patient, "ED")], masks[(v.patient, "ES")]
        for k in range(min(BASAL_SLICES, es.shape[0] - 1)):
            if (es[k] == 1).any():
                x.append(basal_rv_features(ed, es, k))
                y.append(int(not (v.label[k] == 1).any()))
    x, y = np.array(x), np.array(y)
    if len(set(y.tolist())) < 2:
        return None
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    lr = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit((x - mean) / scale, y)
    return {"features": list(BASAL_FEATURES), "mean": mean.tolist(), "scale": scale.tolist(), "coef": lr.coef_[0].tolist(),
            "intercept": float(lr.intercept_[0]), "threshold": 0.5, "slices": int(len(y)), "cleared_in_reference": int(y.sum()),
            "patients": len(patients)}


def predicted_indices(volumes: list[Volume], masks: dict, patients: dict, basal_rv: dict | None = None):
    """Per patient (in order) with ED and ES masks and known spacing: (ED volume, ES volume,
    ``clinical.patient_indices`` of the masks, ES basal slices cleared). ``patients`` is the
    manifest's metadata (height, weight); ``basal_rv``: the ES basal RV check, applied first."""
    from raysegment.clinical import basal_rv_check, patient_indices

    by_patient: dict[str, dict] = {}
    for v in volumes:
        by_patient.setdefault(v.patient, {})[v.phase] = v
    for patient, phases in sorted(by_patient.items()):
        if not all((patient, ph) in masks and ph in phases for ph in ("ED", "ES")) or phases["ED"].spacing is None:
            continue
        meta = patients.get(patient, {})
        es, cleared = basal_rv_check(masks[(patient, "ED")], masks[(patient, "ES")], basal_rv)
        ind = patient_indices(masks[(patient, "ED")], es, phases["ED"].spacing, meta.get("height_cm"), meta.get("weight_kg"))
        yield phases["ED"], phases["ES"], ind, cleared


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
