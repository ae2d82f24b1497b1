"""The diagnosis stage: stratified folds, cross-validated masks, the JSON classifier (checked against
scikit-learn's own soft vote), the basal ES RV check, and the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raysegment import diagnosis
from raysegment.clinical import basal_rv_check
from raysegment.prepare import Volume
from synth import synthetic_volume


def _toy_features(n_per_group=12, seed=0):
    """Feature rows whose groups differ in a few features (EF, volumes, thickness), with noise."""
    rng = np.random.default_rng(seed)
    x, y = [], []
    for i, g in enumerate(diagnosis.GROUPS):
        for _ in range(n_per_group):
            row = rng.normal(0, 1, len(diagnosis.FEATURES))
            row[i] += 3.0  # each group stands out in its own feature
            x.append(row)
            y.append(g)
    return np.array(x), y


def test_folds_are_stratified_balanced_and_seeded():
    groups = {f"p{i:03d}": g for i, g in enumerate(["NOR"] * 16 + ["DCM"] * 16 + ["RV"] * 13)}
    folds = diagnosis.fold_of(groups, 5, seed=3)
    assert folds == diagnosis.fold_of(groups, 5, seed=3)
    assert folds != diagnosis.fold_of(groups, 5, seed=4)
    sizes = np.bincount(list(folds.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for g in ("NOR", "DCM", "RV"):
        per_fold = np.bincount([folds[p] for p, gg in groups.items() if gg == g], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, g


def test_json_classifier_equals_sklearn_soft_vote_and_survives_a_round_trip():
    from sklearn.ensemble import RandomForestClassifier, VotingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _toy_features()
    model = diagnosis.fit(x, y, seed=0)
    reference = VotingClassifier([("lr", make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))),
                                  ("rf", RandomForestClassifier(n_estimators=300, random_state=0))], voting="soft").fit(x, y)
    test = _toy_features(4, seed=1)[0]
    ours = model.predict_proba(test)
    theirs = reference.predict_proba(test)[:, [list(reference.classes_).index(c) for c in model.classes]]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-6)
    again = diagnosis.DiagnosisModel.from_json(model.to_json())
    np.testing.assert_array_equal(again.predict_proba(test), ours)
    # An unknown feature (no height/weight: indexed volumes NaN) takes the training median.
    gap = test[:1].copy()
    gap[0, 2] = np.nan
    filled = test[:1].copy()
    filled[0, 2] = model.fill[2]
    np.testing.assert_array_equal(model.predict_proba(gap), model.predict_proba(filled))


def test_a_file_of_another_format_or_feature_list_is_refused():
    x, y = _toy_features(4)
    d = json.loads(diagnosis.fit(x, y).to_json())
    with pytest.raises(ValueError, match="not a raysegment-diagnosis"):
        diagnosis.DiagnosisModel.from_json(json.dumps({**d, "format": "other"}))
    with pytest.raises(ValueError, match="other features"):
        diagnosis.DiagnosisModel.from_json(json.dumps({**d, "features": ["lv_ef_pct"]}))


def test_cross_validation_reports_accuracy_and_a_confusion_matrix_of_every_prediction():
    x, y = _toy_features()
    cv = diagnosis.cross_validate(x, y, folds=3, repeats=1, seed=0)
    confusion = np.array(cv["confusion"])
    assert confusion.sum() == len(y)
    assert cv["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert cv["accuracy"] > 0.7  # the toy groups are separable; a broken fit would be at chance (0.2)
    y_shuffled = list(np.random.default_rng(0).permutation(y))
    assert diagnosis.cross_validate(x, y_shuffled, folds=3, repeats=1)["accuracy"] < 0.5


def test_basal_check_clears_only_basal_es_slices_and_stops_at_the_first_kept():
    _, ed = synthetic_volume(1, shape=(5, 40, 48))
    _, es = synthetic_volume(2, shape=(5, 40, 48), lv_radius=5.0)
    always = {"mean": [0.0] * 6, "scale": [1.0] * 6, "coef": [0.0] * 6, "intercept": 10.0, "threshold": 0.5}
    never = {**always, "intercept": -10.0}
    out, cleared = basal_rv_check(ed, es, always)
    assert cleared == [0, 1]
    assert not (out[:2] == 1).any() and (out[2:] == es[2:]).all()
    assert ((out == es) | ((es == 1) & (out == 0))).all()  # only RV voxels turn to background
    assert (es[:2] == 1).any()  # the input is left untouched
    same, none = basal_rv_check(ed, es, never)
    assert none == [] and same is es
    # Slice 0 kept → slice 1 is not looked at, whatever the model would say of it.
    basal_kept = {**always, "coef": [0, 0, 0, 0, 0, 100.0], "intercept": -1.0}  # keeps slice 0, would clear slice 1
    _, c = basal_rv_check(ed, es, basal_kept)
    assert c == []
    cleared_below = basal_rv_check(ed, np.concatenate([np.where(es[:1] == 1, 0, es[:1]), es[1:]]), basal_kept)[1]
    assert cleared_below == [1]  # a slice 0 without RV is passed over


def _tiny_volumes(n_patients=4):
    out = []
    for p in range(n_patients):
        for phase, r in (("ED", 7.0), ("ES", 5.0)):
            image, label = synthetic_volume(p * 2 + (phase == "ES"), shape=(3, 32, 32), lv_radius=r)
            out.append(Volume(f"patient{p:03d}", phase, image, label, (10.0, 1.5, 1.5),
                              diagnosis.GROUPS[p % 2], source="synthetic"))
    return out


def test_a_crossval_fold_segments_exactly_its_held_out_patients(tmp_path):
    from raysegment.config import ModelConfig, TrainConfig

    volumes = _tiny_volumes()
    config = TrainConfig(data="memory", model=ModelConfig(backbone="mobilenet_v2", decoder_width=8), image_size=32,
                         crop_size=32, epochs=1, batch_size=4, max_steps_per_epoch=1)
    summary = diagnosis.crossval_fold(volumes, fold=0, folds=2, config=config, device="cpu", out=tmp_path)
    held = summary["patients"]
    assert held and summary["train_patients"] == 4 - len(held)
    assert summary["history"][0]["epoch"] == 0 and np.isfinite(summary["history"][0]["loss"])
    masks = diagnosis.load_crossval_masks(tmp_path, volumes)
    assert sorted({p for p, _ in masks}) == held
    assert all(m.shape == (3, 32, 32) and m.dtype == np.uint8 for m in masks.values())
    assert json.loads((tmp_path / "fold0.json").read_text())["config"]["epochs"] == 1
    # The volumes pack into one 8-bit bundle that loads back within quantisation error.
    diagnosis.save_bundle(volumes, tmp_path / "b.npz")
    back = diagnosis.load_bundle(tmp_path / "b.npz")
    assert [(v.patient, v.phase, v.spacing, v.group) for v in back] == [(v.patient, v.phase, v.spacing, v.group) for v in volumes]
    assert max(float(np.abs(a.image - b.image).max()) for a, b in zip(back, volumes)) <= 0.5 / 255 + 1e-6


def test_shipped_model_loads_with_its_accuracy_and_basal_check():
    model = diagnosis.load("shipped")
    assert model.classes == diagnosis.GROUPS
    assert model.meta["accuracy"] >= 0.9 and model.meta["patients"] == 80
    assert model.basal_rv and model.basal_rv["patients"] == 70  # fitted on the train split only
    p = model.predict_proba(np.array(model.fill))
    assert p.shape == (1, 5) and p.sum() == pytest.approx(1.0)


def test_basal_check_finds_the_base_at_either_end_of_the_stack():
    _, ed = synthetic_volume(1, shape=(5, 40, 48))  # radii shrink with k: slice 0 is the base
    _, es = synthetic_volume(2, shape=(5, 40, 48), lv_radius=5.0)
    always = {"mean": [0.0] * 6, "scale": [1.0] * 6, "coef": [0.0] * 6, "intercept": 10.0, "threshold": 0.5}
    out, cleared = basal_rv_check(ed, es, always)
    flipped, cleared_flipped = basal_rv_check(ed[::-1], es[::-1], always)
    assert cleared == [0, 1] and cleared_flipped == [3, 4]
    np.testing.assert_array_equal(flipped[::-1], out)
