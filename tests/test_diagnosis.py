"""The diagnosis stage: stratified folds, cross-validated masks, the JSON classifier (checked against
scikit-learn's own soft vote), the basal ES RV check, and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synth import synthetic_volume

from raysegment.analysis import basal, diagnosis
from raysegment.analysis.basal import basal_rv_check
from raysegment.cli import diagnosis as diagnosis_cli
from raysegment.data.dataset import all_volumes, load_bundle, save_bundle
from raysegment.data.prepare import Volume
from raysegment.training.crossval import crossval_fold


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
    d = json.loads(diagnosis.fit(x, y, bsa_m2=1.9).to_json())
    with pytest.raises(ValueError, match="not a raysegment-diagnosis"):
        diagnosis.DiagnosisModel.from_json(json.dumps({**d, "format": "other"}))
    # A /1 file (before the training median BSA) still reads, without a BSA to index by.
    old = {k: v for k, v in d.items() if k != "bsa_m2"} | {"format": "raysegment-diagnosis/1"}
    assert diagnosis.DiagnosisModel.from_json(json.dumps(old)).bsa_m2 is None
    assert diagnosis.DiagnosisModel.from_json(json.dumps(d)).bsa_m2 == 1.9
    with pytest.raises(ValueError, match="other features"):
        diagnosis.DiagnosisModel.from_json(json.dumps({**d, "features": ["lv_ef_pct"]}))


def test_a_patient_without_height_or_weight_is_indexed_by_the_models_median_bsa():
    """No BSA: the volumes (mL) and mass (g) are divided by the model's training median BSA, so a
    patient whose BSA is that median gets the features it would have with height and weight; a model
    without one (a /1 file) leaves them NaN, to be filled feature by feature."""
    from raysegment.analysis.clinical import patient_indices

    _, label = synthetic_volume(1, shape=(5, 40, 48))
    _, es = synthetic_volume(2, shape=(5, 40, 48), lv_radius=5.0)
    known = patient_indices(label, es, (10.0, 1.5, 1.5), 180.0, 80.0)  # BSA 2.0 m²
    unknown = patient_indices(label, es, (10.0, 1.5, 1.5), None, None)
    indexed = [i for i, f in enumerate(diagnosis.FEATURES) if f.endswith("_per_m2")]
    assert np.isnan(diagnosis.features(unknown)[indexed]).all()
    np.testing.assert_allclose(diagnosis.features(unknown, 2.0), diagnosis.features(known))
    np.testing.assert_allclose(diagnosis.features(known, 1.5), diagnosis.features(known))  # a known BSA wins
    model = diagnosis.fit(*_toy_features(4), bsa_m2=2.0)
    np.testing.assert_allclose(model.features(unknown), diagnosis.features(known))
    patients = {"a": {"height_cm": 180.0, "weight_kg": 80.0}, "b": {"height_cm": 160.0, "weight_kg": 64.0},
                "c": {"height_cm": 190.0, "weight_kg": 90.0}, "d": {}}
    assert diagnosis.median_bsa_m2(["a", "b", "c", "d"], patients) == pytest.approx(2.0)
    assert diagnosis.median_bsa_m2(["d"], patients) is None


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
    summary = crossval_fold(volumes, fold=0, folds=2, config=config, device="cpu", out=tmp_path)
    held = summary["patients"]
    assert held and summary["train_patients"] == 4 - len(held)
    assert summary["history"][0]["epoch"] == 0 and np.isfinite(summary["history"][0]["loss"])
    masks = diagnosis.load_crossval_masks(tmp_path, volumes)
    assert sorted({p for p, _ in masks}) == held
    assert all(m.shape == (3, 32, 32) and m.dtype == np.uint8 for m in masks.values())
    assert json.loads((tmp_path / "fold0.json").read_text())["config"]["epochs"] == 1
    # The volumes pack into one 8-bit bundle that loads back within quantisation error.
    save_bundle(volumes, tmp_path / "b.npz")
    back = load_bundle(tmp_path / "b.npz")
    assert [(v.patient, v.phase, v.spacing, v.group) for v in back] == [(v.patient, v.phase, v.spacing, v.group) for v in volumes]
    assert max(float(np.abs(a.image - b.image).max()) for a, b in zip(back, volumes)) <= 0.5 / 255 + 1e-6
    # The command on that bundle: the other fold, on one torch thread (beside a training run), said in its record.
    import torch

    threads = torch.get_num_threads()
    try:
        assert diagnosis_cli.main(["crossval-masks", "--data", str(tmp_path / "b.npz"), "--out", str(tmp_path / "cli"),
                                   "--folds", "2", "--fold", "1", "--epochs", "1", "--max-steps", "1", "--batch-size", "2",
                                   "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "cli" / "fold1.json").read_text())
    assert record["config"]["threads_per_worker"] == 1 and sorted(record["patients"]) == sorted(
        {v.patient for v in volumes} - set(held))


def test_crossval_ensemble_segments_each_fold_with_the_members_fold_models(tmp_path):
    from dataclasses import replace

    from raysegment.config import ModelConfig, PredictConfig, TrainConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.model.weights import load_weights_file
    from raysegment.training.crossval import crossval_ensemble

    volumes = _tiny_volumes()
    config = TrainConfig(data="memory", model=ModelConfig(backbone="mobilenet_v2", decoder_width=8), image_size=32,
                         crop_size=32, epochs=1, batch_size=4, max_steps_per_epoch=1)
    held = crossval_fold(volumes, 0, 2, config, "cpu", tmp_path / "a", keep_model=True)["patients"]
    crossval_fold(volumes, 0, 2, replace(config, seed=1), "cpu", tmp_path / "b", keep_model=True)
    assert load_weights_file(tmp_path / "a" / "fold0.safetensors").config == config  # the fold model and its recipe
    [summary] = crossval_ensemble(volumes, [tmp_path / "a", tmp_path / "b"], tmp_path / "ens")
    assert summary["patients"] == held and summary["epochs"] == [1, 1]
    members = [load_weights_file(tmp_path / m / "fold0.safetensors") for m in ("a", "b")]
    predictor = Predictor(members, PredictConfig(precision="fp32", largest_component=False))
    masks = diagnosis.load_crossval_masks(tmp_path / "ens", volumes, PredictConfig(largest_component=False))
    assert sorted({p for p, _ in masks}) == held
    for v in volumes:
        if v.patient in held:
            assert np.array_equal(masks[(v.patient, v.phase)], predictor.predict(v.image, spacing=v.spacing, normalized=True))
    # Members whose folds hold other patients (another --folds or --seed) are refused, not mixed.
    record = json.loads((tmp_path / "b" / "fold0.json").read_text())
    (tmp_path / "b" / "fold0.json").write_text(json.dumps({**record, "patients": record["patients"][:-1]}))
    with pytest.raises(ValueError, match="different patients"):
        crossval_ensemble(volumes, [tmp_path / "a", tmp_path / "b"], tmp_path / "ens2")
    # A member without fold models, or with other folds: refused before any fold is segmented, one line.
    (tmp_path / "c").mkdir()
    (tmp_path / "d").mkdir()
    for f in ("fold0.json", "fold0.safetensors"):
        (tmp_path / "d" / f.replace("0", "1")).write_bytes((tmp_path / "a" / f).read_bytes())
    for member, says in (("c", "--member .*/c: no fold\\*.safetensors"), ("d", "other folds .*/a: fold0; .*/d: fold1")):
        with pytest.raises(ValueError, match=says):
            crossval_ensemble(volumes, [tmp_path / "a", tmp_path / member], tmp_path / "ens3")
        assert not (tmp_path / "ens3").exists()


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


# --------------------------------------------------------------------------- the basal ES check (basal-es/2)

def _constant_check(intercept_rv: float, intercept_heart: float) -> dict:
    """A basal-es/2 check whose probabilities do not depend on the slice: sigmoid(intercept)."""
    from raysegment.analysis.basal import BASAL_ES_FORMAT, SLICE_FEATURES

    n = len(SLICE_FEATURES)
    model = lambda b: {"mean": [0.0] * n, "scale": [1.0] * n, "coef": [0.0] * n, "intercept": b}  # noqa: E731
    return {"format": BASAL_ES_FORMAT, "rv": model(intercept_rv), "heart": model(intercept_heart)}


def test_basal_excess_is_the_expected_volume_of_the_walk():
    from raysegment.analysis.basal import BASAL_ES_SLICES, basal_es_excess

    _, ed = synthetic_volume(1, shape=(6, 40, 48))
    _, es = synthetic_volume(2, shape=(6, 40, 48), lv_radius=5.0)
    spacing = (5.0, 1.5, 1.25)
    voxel_ml = 5.0 * 1.5 * 1.25 / 1000
    area = lambda lab: [(es[k] == lab).sum() * voxel_ml for k in range(BASAL_ES_SLICES)]  # noqa: E731
    # q = 1/2 on every slice: slice k counts with probability (1/2)^(k+1) (left out, and every slice above too).
    half = basal_es_excess(ed, es, spacing, _constant_check(0.0, 0.0))
    for name, lab in (("rv", 1), ("lv", 3), ("myo", 2)):
        assert half[name] == pytest.approx(sum(a / 2 ** (k + 1) for k, a in enumerate(area(lab))), rel=1e-9)
    assert half["p_no_rv"] == {0: 0.5, 1: 0.5, 2: 0.5} == half["p_no_heart"]
    sure = basal_es_excess(ed, es, spacing, _constant_check(40.0, -40.0))  # every basal RV out, every LV kept
    assert sure["rv"] == pytest.approx(sum(area(1))) and sure["lv"] == pytest.approx(0.0, abs=1e-12)
    assert (es == synthetic_volume(2, shape=(6, 40, 48), lv_radius=5.0)[1]).all()  # the input is left untouched
    # A slice 0 without RV is passed over: the walk starts at slice 1 with nothing discounted yet.
    no_top = es.copy()
    no_top[0][no_top[0] == 1] = 0
    skipped = basal_es_excess(ed, no_top, spacing, _constant_check(0.0, 0.0))
    assert sorted(skipped["p_no_rv"]) == [1, 2]
    assert skipped["rv"] == pytest.approx(area(1)[1] / 2 + area(1)[2] / 4, rel=1e-9)
    # A stack that runs from the apex is walked from its end: the same excess, slices named as given.
    flipped = basal_es_excess(ed[::-1], es[::-1], spacing, _constant_check(0.0, 0.0))
    assert flipped["rv"] == pytest.approx(half["rv"]) and sorted(flipped["p_no_rv"]) == [3, 4, 5]


def test_checked_indices_take_the_excess_off_the_es_volumes_and_read_old_checks():
    from raysegment.analysis.basal import basal_rv_check, checked_indices
    from raysegment.analysis.clinical import patient_indices

    _, ed = synthetic_volume(1, shape=(5, 40, 48))
    _, es = synthetic_volume(2, shape=(5, 40, 48), lv_radius=5.0)
    spacing = (10.0, 1.5, 1.25)
    plain = patient_indices(ed, es, spacing)
    assert checked_indices(ed, es, spacing) == (plain, {})
    ind, info = checked_indices(ed, es, spacing, check=_constant_check(0.0, 0.0))
    assert ind["rv_esv_ml"] == pytest.approx(plain["rv_esv_ml"] - info["rv_es_basal_excess_ml"], abs=1e-3)
    assert ind["lv_esv_ml"] == pytest.approx(plain["lv_esv_ml"] - info["lv_es_basal_excess_ml"], abs=1e-3)
    assert info["rv_es_basal_excess_ml"] > 0 and ind["rv_ef_pct"] > plain["rv_ef_pct"]
    assert ind["lv_edv_ml"] == plain["lv_edv_ml"] and ind["lv_mass_g"] == plain["lv_mass_g"]  # ED untouched
    assert info["p_no_rv"] == "0:0.5 1:0.5 2:0.5"
    # A check of the first format (a diagnosis model from before) clears the slices it rejects, as it did.
    old = {"mean": [0.0] * 6, "scale": [1.0] * 6, "coef": [0.0] * 6, "intercept": 10.0, "threshold": 0.5}
    ind_old, info_old = checked_indices(ed, es, spacing, check=old)
    cleared_es, cleared = basal_rv_check(ed, es, old)
    assert ind_old == patient_indices(ed, cleared_es, spacing)
    assert info_old["rv_es_basal_slices_cleared"] == "0,1" and cleared == [0, 1]
    assert info_old["rv_es_basal_excess_ml"] == pytest.approx(plain["rv_esv_ml"] - ind_old["rv_esv_ml"], abs=1e-3)


def _basal_patients(n=16, seed=0):
    """ED/ES volumes whose "masks" draw RV on ES slice 0; in the reference half the patients have
    none there, and in those the masks' basal RV is small against ED (as an atrium cut would be)."""
    rng = np.random.default_rng(seed)
    volumes, masks = [], {}
    for p in range(n):
        name = f"patient{p:03d}"
        _, ed = synthetic_volume(100 + p, shape=(5, 40, 48))
        _, es = synthetic_volume(200 + p, shape=(5, 40, 48), lv_radius=5.0)
        ref_es, mask_es = es.copy(), es.copy()
        if p % 2:  # the reference stops the RV below slice 0; the mask keeps a shrunken blob there
            ref_es[0][ref_es[0] == 1] = 0
            blob = mask_es[0] == 1
            mask_es[0][blob & (rng.random(blob.shape) < 0.6)] = 0
        volumes += [Volume(name, "ED", ed.astype(np.float32), ed, (10.0, 1.5, 1.5), "NOR", source="synthetic"),
                    Volume(name, "ES", es.astype(np.float32), ref_es, (10.0, 1.5, 1.5), "NOR", source="synthetic")]
        masks[(name, "ED")], masks[(name, "ES")] = ed, mask_es
    return volumes, masks


def test_a_fitted_basal_check_learns_which_basal_slices_the_reference_leaves_out():
    from raysegment.analysis.basal import SLICE_FEATURES, basal_es_excess

    volumes, masks = _basal_patients()
    patients = {v.patient for v in volumes}
    rows = basal.basal_slice_rows(volumes, [masks], patients)
    x, y, who = rows["rv"]
    assert x.shape[1] == len(SLICE_FEATURES)
    assert y.sum() == 8 and set(who) == patients  # slice 0 of each odd patient is left out in the reference
    check = basal.fit_basal_check(volumes, [masks], patients)
    assert check["format"] == "basal-es/2" and check["patients"] == 16 and check["rv"]["left_out_in_reference"] == 8
    assert "heart" not in check  # the reference always has the LV where the masks do: nothing to learn
    assert rows["heart"][1].sum() == 0 and len(rows["heart"][1]) > 0
    for v in volumes:
        if v.phase == "ES":
            q = basal_es_excess(masks[(v.patient, "ED")], masks[(v.patient, "ES")], v.spacing, check)["p_no_rv"][0]
            assert (q > 0.5) == (not (v.label[0] == 1).any()), v.patient
    # Scored against the reference, the fitted check (cross-validated over patients) beats no check.
    records, full = basal.basal_check_agreement(volumes, {"toy": masks}, {"none": None}, patients, set(), folds=4)
    by = {(r["check"], r["split"]): r for r in records}
    assert by[("fitted here", "train")]["n"] == by[("none", "train")]["n"] == 16
    assert by[("fitted here", "train")]["rv_esv_ml_mae"] < 0.5 * by[("none", "train")]["rv_esv_ml_mae"]
    assert full["rv"]["slices"] == len(y)
    # The oracle row clears exactly the slices the reference leaves out: here that is all the error.
    assert by[("oracle (the reference's basal slices)", "train")]["rv_esv_ml_mae"] == pytest.approx(0.0, abs=1e-9)
    where = basal.excess_by_slice(volumes, masks, patients)
    assert where["rv"][0] > 0 and where["rv"][1:] == [0.0] * 4 and where["lv"] == [0.0] * 5


@pytest.fixture(scope="module")
def sample_mask_cache(tmp_path_factory):
    """One folder of the shipped MobileNetV2's masks of the sample, so this module segments it once
    (the cache itself: tests/test_predict.py)."""
    return tmp_path_factory.mktemp("mask-cache")


@pytest.mark.slow  # the shipped MobileNetV2 segments the sample's 12 volumes: ~20 s in fp32
def test_basal_command_fits_on_a_segmenters_own_masks_and_keeps_the_classifier(sample_shards, sample_mask_cache, tmp_path, capsys):
    out = tmp_path / "diagnosis.json"
    assert diagnosis_cli.main(["basal", "--data", str(sample_shards), "--model", "shipped:mobilenet_v2",
                               "--mask-cache", str(sample_mask_cache), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    new, shipped = diagnosis.load(out), diagnosis.load("shipped")
    assert new.basal_rv["format"] == "basal-es/2" and new.basal_rv["segmenters"] == ["shipped:mobilenet_v2"]
    assert new.basal_rv["patients"] == 4  # the sample's train split only: its val patients stay unseen
    assert (new.coef, new.trees, new.meta) == (shipped.coef, shipped.trees, shipped.meta)  # the classifier as it was
    table = out.with_suffix(".basal.md").read_text()
    for check in ("none", "shipped's", "fitted here", "oracle (the reference's basal slices)"):
        for split, n in (("train", 4), ("val", 2)):
            assert f"| shipped:mobilenet_v2 | {check} | {split} | {n} |" in table
    assert table.split("\n", 2)[2].split("\n\n")[0] in printed and "| shipped:mobilenet_v2 | rv | " in table
    # Shards without spacing (no info.csv beside the source): one error line, exit 2, nothing written.
    import shutil

    from raysegment.data.prepare import PrepareConfig, prepare

    src = tmp_path / "nospacing"
    shutil.copytree(Path(diagnosis.__file__).parents[1] / "sample", src)
    (src / "info.csv").unlink()
    prepare(PrepareConfig(source=src, out=tmp_path / "shards", progress=False))
    assert diagnosis_cli.main(["basal", "--data", str(tmp_path / "shards"), "--model", "shipped:mobilenet_v2",
                           "--out", str(tmp_path / "never.json")]) == 2
    assert "no volumes with spacing" in capsys.readouterr().err and not (tmp_path / "never.json").exists()


@pytest.mark.slow  # the shipped MobileNetV2 segments the sample's 12 volumes: ~20 s in fp32
def test_basal_command_fits_on_crossval_fold_masks_as_on_the_same_masks_from_a_model(sample_shards, sample_mask_cache,
                                                                                   tmp_path, capsys):
    """``basal --masks FOLDER``: fold masks (here the shipped model's own, written as a fold file) give
    the check ``--model`` gives from the same masks; neither option: one error line, exit 2."""
    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor, predicted_masks

    volumes = all_volumes(sample_shards)
    masks = predicted_masks(Predictor.load("shipped:mobilenet_v2", PredictConfig()), volumes, sample_mask_cache)
    (tmp_path / "cv").mkdir()
    np.savez_compressed(tmp_path / "cv" / "fold0.npz", **{f"{p}/{ph}": m for (p, ph), m in masks.items()})
    for name, source in (("model", ["--model", "shipped:mobilenet_v2", "--mask-cache", str(sample_mask_cache)]),
                         ("folds", ["--masks", str(tmp_path / "cv")])):
        assert diagnosis_cli.main(["basal", "--data", str(sample_shards), *source, "--out", str(tmp_path / f"{name}.json")]) == 0
    by_model, by_folds = diagnosis.load(tmp_path / "model.json"), diagnosis.load(tmp_path / "folds.json")
    assert by_folds.basal_rv["segmenters"] == [f"{tmp_path / 'cv'} (fold masks)"]
    assert {k: v for k, v in by_folds.basal_rv.items() if k != "segmenters"} == \
        {k: v for k, v in by_model.basal_rv.items() if k != "segmenters"}
    capsys.readouterr()
    assert diagnosis_cli.main(["basal", "--data", str(sample_shards), "--out", str(tmp_path / "never.json")]) == 2
    assert "needs --model or --masks" in capsys.readouterr().err and not (tmp_path / "never.json").exists()


def test_fit_command_writes_a_model_and_a_features_csv_that_round_trip(tmp_path, capsys):
    """``diagnosis fit`` on cross-validated masks (here the reference masks themselves) of 15
    patients in 3 groups: the JSON model loads, and the features CSV reads back with the csv
    module to the same patients, groups and columns."""
    import csv

    from synth import drop_info_lines, make_nifti_patient

    from raysegment.data.dataset import load_volumes
    from raysegment.data.prepare import PrepareConfig, prepare

    groups = ("NOR", "DCM", "HCM")
    for i in range(16):
        make_nifti_patient(tmp_path / "src", i + 1, ed=1, es=5, nframes=6, group=groups[i % 3], shape=(4, 40, 48))
    # patient016 without a reference group (Info.cfg without Group:): left out, not a fourth class
    drop_info_lines(tmp_path / "src" / "training" / "patient016", "Group")
    prepare(PrepareConfig(source=tmp_path / "src", out=tmp_path / "shards", val_fraction=0.25, progress=False))
    volumes = load_volumes(tmp_path / "shards", "train") + load_volumes(tmp_path / "shards", "val")
    (tmp_path / "cv").mkdir()
    np.savez_compressed(tmp_path / "cv" / "fold0.npz", **{f"{v.patient}/{v.phase}": v.label for v in volumes})
    out = tmp_path / "model" / "diagnosis.json"
    assert diagnosis_cli.main(["fit", "--data", str(tmp_path / "shards"), "--masks", str(tmp_path / "cv"),
                               "--repeats", "1", "--out", str(out)]) == 0
    model = diagnosis.load(out)
    assert model.meta["patients"] == 15 and "accuracy" in model.meta and set(model.classes) == set(groups)
    assert model.bsa_m2 == pytest.approx(2.0, abs=1e-4)  # every Info.cfg: 180 cm, 80 kg
    printed = capsys.readouterr()
    assert "indexed by 2.00 m², the median BSA" in printed.out
    assert "note: left out, without a reference group (1): patient016" in printed.err
    with open(out.with_suffix(".features.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["patient", "group", *diagnosis.FEATURES]
    assert sorted(r[0] for r in rows[1:]) == sorted({v.patient for v in volumes} - {"patient016"})
    assert {r[1] for r in rows[1:]} == set(groups) and all(len(r) == len(rows[0]) for r in rows)
    assert all(float(v) == float(v) for r in rows[1:] for v in r[2:] if v != "nan")  # numbers, not shifted text


def test_fit_from_a_segmenters_own_masks_says_so_and_scores_the_val_split_apart(tmp_path, tiny_checkpoint, capsys):
    """``diagnosis fit --model``: the segmenter's own masks (no cross-validated folds); the model
    records where its masks came from, and a classifier fitted on the train split alone is scored
    on the val split's patients, the one figure neither the segmenter nor it has seen. (A tiny random
    segmenter: what is tested is where the masks come from and how it is scored, not its accuracy.)"""
    from synth import make_nifti_patient

    from raysegment.data.prepare import PrepareConfig, load_manifest, prepare

    groups = ("NOR", "DCM", "HCM")
    for i in range(15):
        make_nifti_patient(tmp_path / "src", i + 1, ed=1, es=5, nframes=6, group=groups[i % 3], shape=(2, 40, 48))
    prepare(PrepareConfig(source=tmp_path / "src", out=tmp_path / "shards", val_fraction=0.25, progress=False))
    out = tmp_path / "diagnosis.json"
    assert diagnosis_cli.main(["fit", "--data", str(tmp_path / "shards"), "--model", str(tiny_checkpoint),
                               "--repeats", "1", "--out", str(out)]) == 0
    model = diagnosis.load(out)
    assert model.meta["masks"].startswith(f"own masks of {tiny_checkpoint}") and model.meta["segmenter"] == str(tiny_checkpoint)
    check, val = model.meta["val_check"], load_manifest(tmp_path / "shards")["splits"]["val"]
    assert (check["fitted_on"], check["n"]) == (15 - len(val), len(val))
    assert check["correct"] + len(check["wrong"]) == len(val) and all(w.split()[0] in val for w in check["wrong"])
    printed = capsys.readouterr()
    assert f"{check['correct']}/{len(val)} right" in printed.out
    # Its masks draw no LV: such features are filled with 0, said in one line (sklearn raised on NaN).
    assert "warning: no patient has a value for lv_ef_pct" in printed.err
    assert f"{check['correct']}/{len(val)} right" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):  # masks from one place only
        diagnosis_cli.main(["fit", "--data", str(tmp_path / "shards"), "--model", str(tiny_checkpoint),
                            "--masks", str(tmp_path), "--out", str(out)])


def test_misdiagnosed_names_each_wrong_patient_with_truth_and_prediction():
    from raysegment.analysis.diagnosis import misdiagnosed

    assert misdiagnosed(["p1", "p2", "p3"], ["NOR", "DCM", "HCM"], ["NOR", "MINF", "RV"]) == ["p2 DCM→MINF", "p3 HCM→RV"]
    assert misdiagnosed([], [], []) == []


def test_every_diagnosis_command_refuses_missing_shards_in_one_line(tmp_path, capsys):
    from raysegment.cli import diagnosis as diagnosis_cli

    for args in (["pack", "--out", str(tmp_path / "x.npz")], ["fit", "--model", "shipped:mobilenet_v2", "--out", "d.json"],
                 ["basal", "--model", "shipped:mobilenet_v2", "--out", "b.json"]):
        with pytest.raises(SystemExit) as exit_:
            diagnosis_cli.main([args[0], "--data", str(tmp_path / "none"), *args[1:]])
        assert exit_.value.code == 2 and "no shards there" in capsys.readouterr().err.strip().splitlines()[-1]
