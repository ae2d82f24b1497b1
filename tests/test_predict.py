"""The Predictor: one model or an ensemble, its precision, TTA, post-processing, references,
and the same mask on every path (pyfunc, infer, report, raysegment.segment)."""

import warnings
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_checkpoint
from scipy import ndimage
from synth import make_nifti_patient, synthetic_volume

import raysegment
from raysegment.config import AugmentConfig, PredictConfig
from raysegment.inference.predictor import (
    Predictor,
    check_flip_tta,
    contact_pixels,
    keep_largest_component,
    load_model,
    model_version,
    resolve_precision,
)
from raysegment.io.studies import normalize_intensity
from raysegment.model.checkpoint import LoadedModel
from raysegment.model.unet import build_model

FP32 = PredictConfig(precision="fp32")


def _loaded(tiny_model, seed=None, **train_changes) -> LoadedModel:
    model, config = tiny_model
    if seed is not None:
        torch.manual_seed(seed)
        model = build_model(config.model).eval()
    return LoadedModel(model, replace(config, **train_changes), f"test:{seed}")


def _old_keep_largest_component(labels, rv_contact_px=5):
    """The whole-volume rule as it was before the Predictor (reference for the cropped one)."""
    out = labels.copy()
    for lab in (2, 3, 1):
        comps, n = ndimage.label(labels == lab, structure=np.ones((3, 3, 3), bool))
        if n <= 1:
            continue
        sizes = np.bincount(comps.ravel())[1:]
        if lab == 1:
            heart = np.isin(out, (2, 3))
            if heart.any():
                near = ndimage.binary_dilation(heart, structure=np.ones((1, 3, 3), bool), iterations=rv_contact_px)
                touching = np.zeros(n, bool)
                touching[np.unique(comps[near & (comps > 0)]) - 1] = True
                if touching.any():
                    sizes = np.where(touching, sizes, -1)
        out[(comps > 0) & (comps != 1 + int(np.argmax(sizes)))] = 0
    return out


def _old_predict_volume(model, image, image_size, batch_size=16):
    """predict_volume as it was before the Predictor: bilinear in, fp32 forward, bilinear out, argmax."""
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[:, None]
    out = []
    with torch.no_grad():
        for a in range(0, len(x), batch_size):
            xb = F.interpolate(x[a : a + batch_size], size=(image_size, image_size), mode="bilinear", align_corners=False)
            logits = F.interpolate(model(xb).float(), size=image.shape[1:], mode="bilinear", align_corners=False)
            out.append(logits.argmax(1).to(torch.uint8).numpy())
    return _old_keep_largest_component(np.concatenate(out))


@pytest.mark.parametrize("seed", range(6))
def test_cropped_largest_component_equals_the_whole_volume_rule(seed):
    rng = np.random.default_rng(seed)
    labels = np.zeros((5, 60, 70), np.uint8)
    for _ in range(12):  # random blobs of random labels, some touching, some far apart
        z, y, x = rng.integers(0, 5), rng.integers(0, 55), rng.integers(0, 65)
        labels[z : z + rng.integers(1, 3), y : y + rng.integers(2, 9), x : x + rng.integers(2, 9)] = rng.integers(1, 4)
    for px in (1, 3, 5):
        np.testing.assert_array_equal(keep_largest_component(labels, px), _old_keep_largest_component(labels, px))


def test_keep_largest_component_drops_islands_per_label():
    m = np.zeros((4, 20, 20), np.uint8)
    m[1:3, 2:8, 2:8] = 3       # LV: the big blob
    m[0, 15:17, 15:17] = 3     # LV island, far away
    m[2, 10:12, 2:6] = 1       # RV: one component, kept
    out = keep_largest_component(m)
    assert (out[1:3, 2:8, 2:8] == 3).all() and (out[0, 15:17, 15:17] == 0).all()
    assert (out == 1).sum() == (m == 1).sum()
    assert not keep_largest_component(np.zeros((2, 5, 5), np.uint8)).any()
    np.testing.assert_array_equal(keep_largest_component(out), out)  # idempotent


def test_keep_largest_component_rv_must_touch_the_heart():
    m = np.zeros((3, 40, 40), np.uint8)
    m[:, 10:20, 10:20] = 2       # MYO ring (filled square here)
    m[:, 13:17, 13:17] = 3       # LV cavity inside it
    m[:, 10:20, 21:25] = 1       # true RV: small, 1 px from the myocardium
    m[:, 32:40, 0:20] = 1        # false RV: larger, far below the heart
    out = keep_largest_component(m)
    assert (out[:, 10:20, 21:25] == 1).all() and not (out[:, 32:40, 0:20] == 1).any()
    no_heart = np.where(m == 1, 1, 0).astype(np.uint8)  # without a heart to touch, the largest wins
    out2 = keep_largest_component(no_heart)
    assert (out2[:, 32:40, 0:20] == 1).all() and not (out2[:, 10:20, 21:25] == 1).any()


def test_rv_contact_distance_is_in_mm_when_the_spacing_is_known():
    config = PredictConfig()
    assert contact_pixels(config, None) == config.rv_contact_px == 5
    assert contact_pixels(config, (10.0, 1.4, 1.4)) == 5  # 7 mm
    assert contact_pixels(config, (10.0, 0.7, 0.7)) == 10  # finer pixels: more of them
    assert contact_pixels(config, (10.0, 3.5, 3.5)) == 2
    # A false RV 8 px (= 6 mm at 0.75 mm) from the heart is near at 0.75 mm pixels, far at 2 mm pixels.
    m = np.zeros((2, 60, 60), np.uint8)
    m[:, 10:20, 10:20] = 2
    m[:, 10:20, 28:30] = 1  # small, 8 px right of the myocardium
    m[:, 45:60, 0:30] = 1  # big, far below
    near = keep_largest_component(m, contact_pixels(config, (8.0, 0.75, 0.75)))
    far = keep_largest_component(m, contact_pixels(config, (8.0, 2.0, 2.0)))
    assert (near[:, 10:20, 28:30] == 1).all() and not near[:, 45:60].any()
    assert (far[:, 45:60, 0:30] == 1).all()


def test_one_model_predicts_exactly_as_before_the_refactor(tiny_model):
    model, config = tiny_model
    image, _ = synthetic_volume(5, shape=(5, 44, 52))
    new = Predictor(_loaded(tiny_model), replace(FP32, batch_size=2)).predict(image, normalized=True)
    np.testing.assert_array_equal(new, _old_predict_volume(model, image, config.image_size, batch_size=2))
    # Normalisation is the model's recorded recipe: raw int16-like input gives the same mask.
    raw = (image * 2500 - 300).astype(np.int16)
    predictor = Predictor(_loaded(tiny_model), FP32)
    np.testing.assert_array_equal(predictor.predict(raw), predictor.predict(normalize_intensity(raw), normalized=True))


class _NextSliceModel(torch.nn.Module):
    """Labels a pixel RV (1) where the *next* slice is bright: shows which channel is slice k+1."""

    context_slices = 1

    def forward(self, x):
        nxt = x[:, 2]
        zero = torch.zeros_like(nxt)
        return torch.stack([zero, nxt - 0.5, zero - 1, zero - 1], dim=1)


def test_predictor_feeds_slice_neighbours_in_order(tiny_model):
    vol = torch.rand(4, 32, 32).numpy()
    member = replace(_loaded(tiny_model, image_size=32), model=_NextSliceModel())
    pred = Predictor(member, replace(FP32, largest_component=False)).predict(vol, normalized=True)
    for k in range(3):
        np.testing.assert_array_equal(pred[k], (vol[k + 1] > 0.5).astype(np.uint8))
    assert not pred[3].any()  # beyond the stack the neighbour is zero


def test_ensemble_averages_the_members_softmax(tiny_model):
    a, b = _loaded(tiny_model, seed=1), _loaded(tiny_model, seed=2, image_size=48)  # members may differ in grid
    image, _ = synthetic_volume(7, shape=(3, 40, 48))
    pa = Predictor(a, FP32).probabilities(image)
    pb = Predictor(b, FP32).probabilities(image)
    ensemble = Predictor([a, b], FP32)
    assert ensemble.version == "test:1+test:2"
    pe = ensemble.probabilities(image)
    assert pe.shape == (4, 3, 40, 48)
    np.testing.assert_allclose(pa.sum(0), 1, atol=1e-5)
    np.testing.assert_allclose(pe, (pa + pb) / 2, atol=1e-6)
    assert not np.allclose(pa, pb, atol=1e-3)  # two different models, so the test means something
    expected = keep_largest_component(pe.argmax(0).astype(np.uint8))
    np.testing.assert_array_equal(ensemble.predict(image), expected)


def test_flip_tta_only_for_models_trained_with_flips(tiny_model):
    plain = _loaded(tiny_model)
    assert plain.config.augment.flip_prob == 0  # today's default: no mirrored hearts in training
    with pytest.raises(ValueError, match="flip TTA needs a model trained with left-right flips"):
        Predictor(plain, replace(FP32, flip_tta=True))
    flipped = replace(_loaded(tiny_model, augment=AugmentConfig(flip_prob=0.5), image_size=48), model=_RampModel())
    check_flip_tta(flipped.config)
    image = np.random.default_rng(0).random((2, 48, 48)).astype(np.float32)  # on the model grid: no resampling
    tta = Predictor(flipped, replace(FP32, flip_tta=True)).probabilities(image, normalized=True)
    # TTA averages the logits with the mirrored image's, mirrored back: the ramp cancels out,
    # the image term (the same in both) stays.
    img = torch.from_numpy(image)
    expected = torch.stack([torch.zeros_like(img), img - 0.5, torch.zeros_like(img), torch.zeros_like(img) - 1]).softmax(0)
    np.testing.assert_allclose(tta, expected.numpy(), atol=1e-5)
    direct = Predictor(flipped, FP32).probabilities(image, normalized=True)
    assert np.abs(direct - tta).max() > 0.1


class _RampModel(torch.nn.Module):
    """Logits: class 1 = image − 0.5; class 2 = a left-to-right ramp (not mirror-symmetric)."""

    context_slices = 0

    def forward(self, x):
        img = x[:, 0]
        ramp = torch.linspace(-1, 1, img.shape[-1]).expand_as(img)
        return torch.stack([torch.zeros_like(img), img - 0.5, ramp, torch.zeros_like(img) - 1], dim=1)


def test_precision_is_resolved_per_device_and_recorded(tiny_model, monkeypatch):
    from raysegment.inference import predictor as predict

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(predict, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(predict, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    predictor = Predictor(_loaded(tiny_model))
    assert predictor.config.precision == "fp32" and predictor.dtype is None


def test_references_load_to_one_shape(tmp_path, tiny_model, tiny_checkpoint):
    from raysegment.model.weights import export_weights, sha256

    weights = export_weights(tiny_checkpoint, tmp_path / "tiny.safetensors")
    for ref in (str(tiny_checkpoint), str(weights)):
        loaded = load_model(ref)
        assert isinstance(loaded, LoadedModel) and not loaded.model.training
        assert loaded.config == tiny_model[1] and loaded.state == {"epoch": 0}
    assert model_version(str(weights)) == f"file:tiny.safetensors:{sha256(weights)[:12]}"
    assert load_model(str(weights)).version == model_version(str(weights))
    assert model_version(str(tiny_checkpoint)) == f"file:ckpt:{sha256(tiny_checkpoint / 'model.pt')[:12]}"
    shipped = load_model("shipped:mobilenet_v2")
    assert shipped.config.model.backbone == "mobilenet_v2" and shipped.version.startswith("file:mobilenet_v2.safetensors:")
    for bad in (str(tmp_path / "nothing"), str(tmp_path)):
        with pytest.raises(FileNotFoundError, match="not a models:/ URI"):
            load_model(bad)


def test_segment_api_returns_a_mask_on_the_input_grid(tmp_path, tiny_model):
    pdir = make_nifti_patient(tmp_path, 4, ed=1, es=3, nframes=4, shape=(3, 40, 48))
    predictor = Predictor(_loaded(tiny_model), FP32)
    cine = nib.load(str(pdir / "patient004_4d.nii.gz"))
    mask = raysegment.segment(cine, model=predictor)
    assert mask.shape == cine.shape and np.allclose(mask.affine, cine.affine) and mask.get_data_dtype() == np.uint8
    data = np.asarray(cine.dataobj, dtype=np.float64)
    spacing = tuple(float(z) for z in cine.header.get_zooms()[:3])[::-1]
    for t in range(4):
        frame = np.transpose(data[..., t], (2, 1, 0))
        expected = np.transpose(predictor.predict(frame, spacing=spacing), (2, 1, 0))
        np.testing.assert_array_equal(np.asarray(mask.dataobj)[..., t], expected)
    one = raysegment.segment(pdir / "patient004_frame01.nii.gz", model=predictor)
    assert one.shape == (48, 40, 3)
    with pytest.raises(TypeError, match=r"takes a NIfTI path, a nibabel image or a DICOM folder, not ndarray .*Predictor.load"):
        raysegment.segment(data[..., 0], model=predictor)  # an array: what it is not, and what to call instead
    with pytest.raises(FileNotFoundError, match=r"no shipped weights for 'resnet' \(there are shipped:densenet121, "
                                                r"shipped:mobilenet_v2\)"):
        raysegment.segment(pdir / "patient004_frame01.nii.gz", model="shipped:resnet")


def test_pyfunc_infer_and_report_give_byte_identical_masks(tmp_path, tiny_model):
    """One study through the three serving paths: the MLflow pyfunc, the batch job's study function
    and report's evaluation over prepared shards."""
    import mlflow.pyfunc

    from raysegment.data.dataset import load_volumes
    from raysegment.data.prepare import PrepareConfig, prepare
    from raysegment.inference.predictor import predict_volumes
    from raysegment.inference.study import segment_study
    from raysegment.registry.logged_models import pyfunc_signature

    # Pixels of 2 mm: every path passes the spacing on (RV contact 4 px; 5 px without spacing).
    make_nifti_patient(tmp_path / "src", 1, ed=1, es=5, nframes=6, spacing=(10.0, 2.0, 2.0), shape=(4, 40, 48))
    study = tmp_path / "src" / "training" / "patient001" / "patient001_frame05.nii.gz"
    model, config = tiny_model
    ckpt = write_checkpoint(tmp_path / "ckpt", model, config)

    predictor = Predictor.load(str(ckpt), PredictConfig(in_plane="auto"))  # the pyfunc's default, as infer's
    rows = segment_study(study, predictor, str(ckpt), tmp_path / "out")
    infer_mask = np.transpose(np.asarray(nib.load(rows[0]["mask"]).dataobj), (2, 1, 0))

    prepare(PrepareConfig(source=tmp_path / "src", out=tmp_path / "shards", val_fraction=0.0, progress=False))
    (volume,) = [v for v in load_volumes(tmp_path / "shards", "train") if v.phase == "ES"]
    ((_, report_mask),) = list(predict_volumes(predictor, [volume]))

    code = __import__("raysegment.registry.pyfunc_model", fromlist=["x"]).__file__
    raw = np.transpose(np.asarray(nib.load(str(study)).dataobj), (2, 1, 0)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlflow.pyfunc.save_model(str(tmp_path / "pyfunc"), python_model=code, artifacts={"checkpoint": str(ckpt)},
                                 signature=pyfunc_signature(), pip_requirements=["raysegment"])  # as registration: no inference
        pyfunc_mask = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc")).predict(raw, params={"spacing_mm": [10.0, 2.0, 2.0]})
    assert not [w for w in caught if "type hint" in str(w.message)]  # the reminder users saw on every registration

    assert infer_mask.dtype == report_mask.dtype == pyfunc_mask.dtype == np.uint8
    assert infer_mask.any()
    np.testing.assert_array_equal(infer_mask, report_mask)
    np.testing.assert_array_equal(infer_mask, pyfunc_mask)


def test_diagnosis_pyfunc_gives_the_classifiers_probabilities_without_a_type_hint_reminder(tmp_path):
    """The diagnosis pyfunc, saved as registration logs it: a DataFrame of feature rows in, the JSON
    classifier's group and probabilities out."""
    import mlflow.pyfunc
    import pandas as pd

    from raysegment.analysis.diagnosis import FEATURES, load
    from raysegment.model.weights import SHIPPED_DIR
    from raysegment.registry.logged_models import diagnosis_model_kwargs

    model = load("shipped")
    rows = pd.DataFrame([model.fill, np.asarray(model.fill) * 1.3], columns=list(FEATURES))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlflow.pyfunc.save_model(str(tmp_path / "pyfunc"), **diagnosis_model_kwargs(SHIPPED_DIR / "diagnosis.json"))
        out = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc")).predict(rows)
    assert not [w for w in caught if "type hint" in str(w.message)]
    p = model.predict_proba(rows.to_numpy(float))
    np.testing.assert_allclose(out[[f"p_{c}" for c in model.classes]].to_numpy(), p)
    assert list(out["group"]) == [model.classes[i] for i in p.argmax(1)]


def test_diagnosis_pyfunc_diagnoses_rows_of_patient_indices_as_the_batch_job_does(tmp_path):
    """Rows of patient indices (what ``raysegment.clinical`` returns, results.csv holds) get
    ``analysis.patient.assess``'s group and probabilities: a patient without height or weight
    indexed by the model's median BSA (not each per-m² feature's median, as a feature row with NaN
    there gets), one with a ``bsa_m2`` and no per-m² values by its own; the group withheld where
    the LV's ES exceeds its ED or the volumes are NaN."""
    import mlflow.pyfunc
    import pandas as pd
    from synth import sample_cine

    from raysegment.analysis.diagnosis import FEATURES, features, load
    from raysegment.analysis.patient import assess
    from raysegment.model.weights import SHIPPED_DIR
    from raysegment.registry.logged_models import diagnosis_model_kwargs

    model = load("shipped")
    _, labels, spacing = sample_cine("patient003")  # DCM
    rows = [assess(labels[0], labels[1], spacing, 170.0, 70.0, model), assess(labels[0], labels[1], spacing, None, None, model),
            assess(labels[1], labels[0], spacing, None, None, model)]
    rows.append(rows[0] | {k: float("nan") for k in ("lv_edv_ml", "lv_esv_ml")})
    rows.append({k: v for k, v in rows[0].items() if not k.endswith("_per_m2")})  # a BSA given, no per-m² values
    # Saved as registration logs it: its signature, every column optional, the rest dropped.
    mlflow.pyfunc.save_model(str(tmp_path / "pyfunc"), **diagnosis_model_kwargs(SHIPPED_DIR / "diagnosis.json"))
    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    out = pyfunc.predict(pd.DataFrame(rows).assign(study="patient003"))
    p_cols = [f"p_{c}" for c in model.classes]
    for i in (0, 1):
        assert out["group"][i] == rows[i]["diagnosis"] and out["diagnosis_withheld"][i] == ""
        np.testing.assert_allclose(out.loc[i, p_cols].to_numpy(float), [rows[i][c] for c in p_cols], atol=1e-4)
    assert list(out["diagnosis_withheld"][2:4]) == ["es_above_ed_lv", "no_volumes"] and out["group"][2:4].isna().all()
    assert out.loc[2:3, p_cols].isna().all(axis=None)
    assert out["group"][4] == rows[0]["diagnosis"]  # the volumes indexed by the row's own BSA
    np.testing.assert_allclose(out.loc[4, p_cols].to_numpy(float), out.loc[0, p_cols].to_numpy(float), atol=1e-4)
    # The same patient as a feature row whose per-m² columns are NaN: each one's median instead.
    median_filled = pyfunc.predict(pd.DataFrame([features(rows[1])], columns=list(FEATURES)))
    assert abs(median_filled["p_DCM"][0] - out["p_DCM"][1]) > 0.1, (median_filled, out)
    with pytest.raises(ValueError, match="takes rows of patient indices"):  # neither kind of row
        pyfunc.predict(pd.DataFrame({"lv_edv_ml": [100.0], "lv_ef_pct": [55.0]}))


def test_mm_grid_keeps_shape_and_scale():
    """A ``pixel_mm`` grid resamples by the true spacing: a disc of 20 mm radius on a 1.0 mm grid
    and on a 2.0 mm grid becomes the same disc on the network grid (not stretched to fill it)."""
    from raysegment.data.dataset import grid_slice, mm_shape

    assert mm_shape((100, 50), (1.0, 2.0), 1.5) == (67, 67)
    assert mm_shape((100, 50), None, 1.5) == (100, 50)
    discs = []
    for mm, n in ((1.0, 120), (2.0, 60)):
        yy, xx = np.mgrid[:n, :n] * mm
        label = ((yy - n * mm / 2) ** 2 + (xx - n * mm / 2) ** 2 < 20 ** 2).astype(np.uint8)
        _, lab = grid_slice(label.astype(np.float32), label, 96, (10.0, mm, mm), pixel_mm=1.5)
        assert lab.shape == (96, 96)
        discs.append(int(lab.sum()))
    expected = np.pi * (20 / 1.5) ** 2
    assert all(abs(d - expected) / expected < 0.05 for d in discs), discs
    # Stretched (no pixel_mm): the 1 mm disc covers four times the share of the 2 mm one's grid.
    _, lab = grid_slice(np.zeros((60, 60), np.float32), np.ones((60, 60), np.uint8), 96)
    assert lab.shape == (96, 96) and int(lab.sum()) == 96 * 96


def test_mm_grid_predictor_uses_spacing(tiny_model):
    """A ``pixel_mm`` model sees the slice resampled by its spacing (zero-padded to a multiple of
    32 pixels), and the labels come back on the image's own grid; models without it are unchanged."""
    model, config = tiny_model
    image, _ = synthetic_volume(3, shape=(2, 40, 48))
    seen = []
    hook = model.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    try:
        mm = Predictor(LoadedModel(model, replace(config, pixel_mm=1.0), "t"), FP32)
        out = mm.predict(image, spacing=(8.0, 2.0, 2.0), normalized=True)
        assert out.shape == image.shape and seen[-1] == (96, 96)  # 80 × 96 px at 1 mm, padded to 96 × 96
        mm.predict(image, normalized=True)  # no spacing: the image's pixels
        assert seen[-1] == (64, 64)
        Predictor(LoadedModel(model, config, "t"), FP32).predict(image, spacing=(8.0, 2.0, 2.0), normalized=True)
        assert seen[-1] == (config.image_size, config.image_size)
    finally:
        hook.remove()


def test_a_model_registered_under_the_flat_layout_still_loads(tmp_path, tiny_model):
    """The pyfunc code a model registered before the stage packages carries (it imports
    ``raysegment.checkpoint`` and ``raysegment.predict``) loads and predicts as today's Predictor."""
    from pathlib import Path

    import mlflow.pyfunc

    from raysegment.registry.logged_models import pyfunc_signature

    model, config = tiny_model
    ckpt = write_checkpoint(tmp_path / "ckpt", model, config)
    old_code = Path(__file__).with_name("data") / "pyfunc_model_flat_layout.py"
    assert "from raysegment.predict import Predictor" in old_code.read_text()
    mlflow.pyfunc.save_model(str(tmp_path / "pyfunc"), python_model=str(old_code), artifacts={"checkpoint": str(ckpt)},
                             signature=pyfunc_signature(), pip_requirements=["raysegment"])
    image, _ = synthetic_volume(5, shape=(3, 40, 48))
    got = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc")).predict(image, params={"spacing_mm": [10.0, 1.5, 1.5]})
    np.testing.assert_array_equal(got, Predictor.load(str(ckpt)).predict(image, spacing=(10.0, 1.5, 1.5)))


def test_predicted_masks_cache_reads_back_the_same_segmenter_and_settings_only(tmp_path, tiny_model, sample_shards):
    """``predicted_masks(..., cache)``: the first call segments and saves; the same model version,
    settings and volumes read the file back (here edited, to see it is read); other settings are
    another entry."""
    from raysegment.data.dataset import load_volumes
    from raysegment.inference.predictor import Predictor, predicted_masks

    model, config = tiny_model
    volumes = load_volumes(sample_shards, "val")
    predictor = Predictor(LoadedModel(model, config, "tiny"), PredictConfig(precision="fp32"))
    calls = []
    first = predicted_masks(predictor, volumes, tmp_path / "cache", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, len(volumes)) for k in range(1, len(volumes) + 1)]
    (saved,) = (tmp_path / "cache").glob("masks-*.npz")
    assert set(first) == {(v.patient, v.phase) for v in volumes}
    assert all(np.array_equal(first[k], np.load(saved)[f"{k[0]}/{k[1]}"]) for k in first)
    np.savez_compressed(saved, **{f"{p}/{ph}": np.full_like(m, 2) for (p, ph), m in first.items()})  # no model says that
    cached = predicted_masks(predictor, volumes, tmp_path / "cache", progress=lambda done, total: calls.append(done))
    assert all((m == 2).all() for m in cached.values()) and len(calls) == len(volumes)  # nothing segmented
    other = Predictor(LoadedModel(model, config, "tiny"), PredictConfig(precision="fp32", largest_component=False))
    again = predicted_masks(other, volumes, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("masks-*.npz"))) == 2
    assert all(np.array_equal(again[k], predicted_masks(other, volumes)[k]) for k in again)


def test_auto_in_plane_segments_a_study_whose_rows_run_the_other_way_as_it_does_the_stored_one():
    """NIfTI converters differ in whether rows run down (as DICOM's) or up, and the shipped models
    learnt ACDC's way alone: with rows reversed, DenseNet-121's val Dice fell from .925 to .855
    (`report evaluate --in-plane rows-reversed`). ``in_plane="auto"`` takes, per study, the way the
    models segment with more confidence: a bundled sample volume stored and with its rows reversed
    gets the same mask, turned back; segmented as stored, the reversed one gets a worse one."""
    from pathlib import Path

    from raysegment.analysis.metrics import dice
    from raysegment.data.volumes import read_h5_volume

    sample = Path(raysegment.__file__).parent / "sample" / "volumes" / "patient003_frame01.h5"
    vol = read_h5_volume(sample)
    auto = Predictor.load("shipped:mobilenet_v2", replace(FP32, in_plane="auto"))
    stored = auto.predict(vol.image)
    reversed_rows = np.ascontiguousarray(vol.image[:, ::-1])
    assert auto.in_plane_for(vol.image) == "as-stored" and auto.in_plane_for(reversed_rows) == "rows-reversed"
    assert np.array_equal(auto.predict(reversed_rows), stored[:, ::-1])
    fixed = Predictor(auto.members, FP32)  # as-stored unless a call says "auto" (the pyfunc's params do)
    assert np.array_equal(fixed.predict(reversed_rows, in_plane="auto"), stored[:, ::-1])
    probs = auto.probabilities(reversed_rows)  # turned back too
    assert np.array_equal(probs.argmax(0)[:, ::-1] == 3, auto.probabilities(vol.image).argmax(0) == 3)
    as_is = Predictor(auto.members, replace(FP32, in_plane="as-stored")).predict(reversed_rows)[:, ::-1]
    assert auto.auto_turns == {"as-stored": 3, "rows-reversed": 3}  # what `report evaluate --auto-in-plane` prints
    label = vol.label
    assert dice(stored == 1, label == 1) > 0.8 and dice(as_is == 1, label == 1) < dice(stored == 1, label == 1) - 0.02


def test_the_registered_pyfunc_turns_a_study_whose_rows_run_the_other_way_unless_told_not_to(tmp_path):
    """A registered version's pyfunc takes ``params={"in_plane": …}`` (default "auto", as infer): a
    sample volume with its rows reversed gets the stored volume's mask turned back; "as-stored"
    segments it as it lies; a word that is no turn is refused by name."""
    from pathlib import Path

    import mlflow.pyfunc

    from raysegment.data.volumes import read_h5_volume
    from raysegment.registry.logged_models import pyfunc_signature

    (shipped,) = Predictor.load("shipped:mobilenet_v2").members
    ckpt = write_checkpoint(tmp_path / "ckpt", shipped.model, shipped.config)
    code = __import__("raysegment.registry.pyfunc_model", fromlist=["x"]).__file__
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*An input example was not provided")  # as registration
        mlflow.pyfunc.save_model(str(tmp_path / "pyfunc"), python_model=code, artifacts={"checkpoint": str(ckpt)},
                                 signature=pyfunc_signature(), pip_requirements=["raysegment"])
    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    image = read_h5_volume(Path(raysegment.__file__).parent / "sample" / "volumes" / "patient003_frame01.h5").image
    reversed_rows = np.ascontiguousarray(image[:, ::-1])
    stored = Predictor(shipped).predict(image)
    np.testing.assert_array_equal(pyfunc.predict(reversed_rows), stored[:, ::-1])
    np.testing.assert_array_equal(pyfunc.predict(reversed_rows, params={"in_plane": "as-stored"}),
                                  Predictor(shipped).predict(reversed_rows))
    assert not np.array_equal(Predictor(shipped).predict(reversed_rows), stored[:, ::-1])
    with pytest.raises(ValueError, match=r"in_plane must be one of .*'rows-reversed'.*got 'upside-down'"):
        pyfunc.predict(image, params={"in_plane": "upside-down"})


def test_each_in_plane_turn_is_its_own_inverse_and_transposing_swaps_the_spacing():
    from raysegment.config import IN_PLANE
    from raysegment.data.volumes import Volume, in_plane
    from raysegment.io.studies import turn_in_plane

    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for how in IN_PLANE:
        assert np.array_equal(turn_in_plane(turn_in_plane(a, how), how), a), how
    assert turn_in_plane(a, "transposed").shape == (2, 4, 3) and turn_in_plane(a, "rows-reversed")[0, 0, 0] == a[0, 2, 0]
    v = Volume("p", "ED", a.astype(float), a, (10.0, 1.5, 1.25), "NOR", "x")
    t = in_plane(v, "transposed")
    assert t.spacing == (10.0, 1.25, 1.5) and np.array_equal(t.label, a.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="one of as-stored"):
        turn_in_plane(a, "sideways")
