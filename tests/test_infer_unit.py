"""Inference building blocks without Ray: study discovery, masks on the input grid, QC, ledger, weights."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from raysegment.infer import Ledger, StudyError, acdc_phase, find_studies, gt_for, read_study, segment_study
from raysegment.models import ModelConfig, build_model
from raysegment.train import TrainConfig, save_checkpoint
from raysegment.weights import checkpoint_from_weights, export_weights, load_weights_file
from synth import make_nifti_patient, synthetic_volume


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = TrainConfig(data="unused", model=ModelConfig(backbone="mobilenet_v2", decoder_width=8), image_size=64)
    return build_model(config.model).eval(), config


def test_find_studies_skips_ground_truth(tmp_path):
    pdir = make_nifti_patient(tmp_path, 3, ed=1, es=4, nframes=5)
    names = [p.name for p in find_studies(tmp_path)]
    assert names == ["patient003_4d.nii.gz", "patient003_frame01.nii.gz", "patient003_frame04.nii.gz"]
    assert gt_for(pdir / "patient003_frame01.nii.gz").name == "patient003_frame01_gt.nii.gz"
    assert gt_for(pdir / "patient003_4d.nii.gz") is None
    assert acdc_phase(pdir / "patient003_frame04.nii.gz") == "ES"
    assert acdc_phase(pdir / "patient003_4d.nii.gz") is None


def test_mask_keeps_oblique_affine_and_grid(tmp_path, tiny_model):
    model, config = tiny_model
    img, _ = synthetic_volume(2, shape=(3, 40, 52))
    affine = np.array([[0.2, 1.3, 0.0, 5], [1.4, -0.1, 0.3, -7], [0.0, 0.1, 8.5, 2], [0, 0, 0, 1]])
    src = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image((np.transpose(img, (2, 1, 0)) * 4000 - 1000).astype(np.int16), affine), str(src))
    rows = segment_study(src, model, config, "file", "v", tmp_path / "out", flip_tta=True, batch_size=2)
    seg = nib.load(rows[0]["mask"])
    assert seg.shape == (52, 40, 3) and np.allclose(seg.affine, affine) and seg.get_data_dtype() == np.uint8
    zooms = nib.load(str(src)).header.get_zooms()
    r = rows[0]
    assert r["volume_lv_ml"] == pytest.approx(r["voxels_lv"] * np.prod(zooms) / 1000)
    assert r["lv_myo_mass_g"] == pytest.approx(1.05 * r["volume_myo_ml"])
    assert "dice_lv" not in r  # no _gt file
    assert isinstance(r["qc_flags"], str)


def test_bad_studies_raise_study_error(tmp_path):
    cases = {
        "zero.nii": b"",
        "text.nii.gz": b"not a nifti",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(StudyError):
            read_study(tmp_path / name)
    nan = np.ones((20, 20, 3), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(StudyError, match="NaN"):
        read_study(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((20, 20), np.int16), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(StudyError, match="3-D or 4-D"):
        read_study(tmp_path / "flat.nii.gz")


def test_ledger_survives_a_torn_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(path)
    led.append({"path": "/a", "sha256": "1", "model_version": "m/1", "status": "done"})
    with open(path, "a") as f:
        f.write('{"path": "/b", "sha2')  # killed mid-write
    again = Ledger(path)
    assert again.has("/a", "1", "m/1") and not again.has("/b", "1", "m/1")
    again.append({"path": "/b", "sha256": "2", "model_version": "m/1", "status": "failed"})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["path"] for e in lines] == ["/a", "/b"]


def test_weights_file_round_trip(tmp_path, tiny_model):
    model, config = tiny_model
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_checkpoint(ckpt, model, None, config, {"epoch": 3})
    out = export_weights(ckpt, tmp_path / "mobilenet_v2.safetensors")
    loaded, cfg = load_weights_file(out)
    assert cfg == config
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=2e-2, rtol=0)  # fp16 storage
    back = checkpoint_from_weights(out, tmp_path / "back")
    assert json.loads((back / "state.json").read_text())["epoch"] == 3


def _checkpoint(tmp_path, tiny_model, history=()):
    model, config = tiny_model
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    save_checkpoint(ckpt, model, None, config, {"epoch": len(history) - 1, "history": list(history)})
    return ckpt


def test_weights_cli_writes_checksums_that_catch_corruption(tmp_path, tiny_model):
    from raysegment import weights

    out = tmp_path / "shipped" / "mobilenet_v2.safetensors"
    assert weights.main(["export", str(_checkpoint(tmp_path, tiny_model)), "--out", str(out)]) == 0
    assert (out.parent / "SHA256SUMS").read_text().split() == [weights.sha256(out), "mobilenet_v2.safetensors"]
    assert weights.main(["verify", "--folder", str(out.parent)]) == 0
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF
    out.write_bytes(bytes(data))
    assert weights.main(["verify", "--folder", str(out.parent)]) == 1


def test_init_weights_must_match_the_model(tmp_path, tiny_model):
    from dataclasses import replace

    from raysegment.weights import init_state_dict

    model, config = tiny_model
    out = export_weights(_checkpoint(tmp_path, tiny_model), tmp_path / "w.safetensors")
    fresh = build_model(config.model)
    fresh.load_state_dict(init_state_dict(out, config.model))
    for (k, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-2, rtol=1e-2, msg=k)
    with pytest.raises(ValueError, match="decoder_width=16"):
        init_state_dict(out, replace(config.model, decoder_width=16))
    # 2-D weights widen to a 2.5-D model that predicts exactly what the 2-D one does.
    wide_config = replace(config.model, context_slices=1)
    wide = build_model(wide_config).eval()
    wide.load_state_dict(init_state_dict(out, wide_config))
    narrow, _ = load_weights_file(out)
    from raysegment.models import with_context

    vol = torch.from_numpy(synthetic_volume(seed=3)[0].astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(wide(with_context(vol, 1)), narrow(vol[:, None]), atol=1e-5, rtol=1e-5)
    wide_file = tmp_path / "wide.safetensors"
    ckpt2 = tmp_path / "wide-ckpt"
    ckpt2.mkdir()
    save_checkpoint(ckpt2, wide, None, replace(config, model=wide_config), {"epoch": 0})
    export_weights(ckpt2, wide_file)
    with pytest.raises(ValueError, match="cannot narrow"):
        init_state_dict(wide_file, config.model)


def test_figures_write_learning_curves_and_overlays(tmp_path, tiny_model):
    from raysegment.prepare import PrepareConfig, prepare
    from raysegment.report import figures
    from synth import make_h5_dataset

    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,), shape=(3, 40, 48))
    prepare(PrepareConfig(source=src, out=tmp_path / "shards", progress=False))
    history = [{"epoch": e, "loss": 1.0 / (e + 1), "dice_rv": 0.1 * e, "dice_myo": 0.1 * e, "dice_lv": 0.2 * e,
                "dice_mean": 0.13 * e} for e in range(3)]
    written = figures({"tiny": str(_checkpoint(tmp_path, tiny_model, history))}, tmp_path / "shards", tmp_path / "fig")
    names = sorted(p.name for p in written)
    assert names == ["learning_curves.png", "overlay_tiny_patient002_ED.png", "overlay_tiny_patient002_ES.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_configs_saved_before_context_slices_load_as_2d():
    config = TrainConfig(data="x", model=ModelConfig(backbone="densenet121", decoder_width=16, context_slices=1))
    d = config.to_dict()
    assert TrainConfig.from_dict(d) == config
    del d["model"]["context_slices"]
    old = TrainConfig.from_dict(d)
    assert old.model == ModelConfig(backbone="densenet121", decoder_width=16, context_slices=0)


def test_flip_tta_is_refused_for_a_model_trained_without_flips(tmp_path, tiny_model):
    from dataclasses import replace

    from raysegment import report
    from raysegment.dataset import AugmentConfig
    from raysegment.train import check_flip_tta

    _, config = tiny_model
    assert config.augment.flip_prob == 0  # the default: no mirrored hearts in training
    ckpt = _checkpoint(tmp_path, tiny_model)
    with pytest.raises(ValueError, match="flip TTA needs a model trained with left-right flips"):
        report.evaluate(str(ckpt), tmp_path / "no-shards", splits=("val",), flip_tta=True)
    args = ["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "no-shards"), "--splits", "val", "--flip-tta"]
    assert report.main(args) == 2  # the CLI says why in one line, no traceback
    check_flip_tta(replace(config, augment=AugmentConfig(flip_prob=0.5)))  # trained with flips: allowed
