"""Weights files (fp16 safetensors + config), checksums, fine-tuning init and 2-D → 2.5-D widening."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import write_checkpoint
from synth import synthetic_volume

from raysegment.model.unet import build_model, with_context
from raysegment.model.weights import checkpoint_from_weights, export_weights, init_state_dict, load_weights_file


def test_weights_file_round_trip(tmp_path, tiny_model):
    model, config = tiny_model
    ckpt = write_checkpoint(tmp_path / "ckpt", model, config, {"epoch": 3})
    umask = os.umask(0o022)
    try:
        out = export_weights(ckpt, tmp_path / "mobilenet_v2.safetensors")
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644 and [p.name for p in tmp_path.iterdir() if p.is_file()] == [out.name]
    loaded = load_weights_file(out)
    assert loaded.config == config and loaded.state == {"epoch": 3} and not loaded.model.training
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), atol=2e-2, rtol=0)  # fp16 storage
    back = checkpoint_from_weights(out, tmp_path / "back")
    assert json.loads((back / "state.json").read_text())["epoch"] == 3


def test_weights_cli_writes_checksums_that_catch_corruption(tmp_path, tiny_model, tiny_checkpoint):
    from raysegment.cli import weights as weights_cli
    from raysegment.model import weights

    out = tmp_path / "shipped" / "mobilenet_v2.safetensors"
    assert weights_cli.main(["export", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert (out.parent / "SHA256SUMS").read_text().split() == [weights.sha256(out), "mobilenet_v2.safetensors"]
    assert weights_cli.main(["verify", "--folder", str(out.parent)]) == 0
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF
    out.write_bytes(bytes(data))
    assert weights_cli.main(["verify", "--folder", str(out.parent)]) == 1


def test_init_weights_must_match_the_model(tmp_path, tiny_model, tiny_checkpoint):
    model, config = tiny_model
    out = export_weights(tiny_checkpoint, tmp_path / "w.safetensors")
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
    narrow = load_weights_file(out).model
    vol = torch.from_numpy(synthetic_volume(seed=3)[0].astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(wide(with_context(vol, 1)), narrow(vol[:, None]), atol=1e-5, rtol=1e-5)
    ckpt2 = write_checkpoint(tmp_path / "wide-ckpt", wide, replace(config, model=wide_config))
    wide_file = export_weights(ckpt2, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="cannot narrow"):
        init_state_dict(wide_file, config.model)


def test_init_weights_add_or_drop_the_deep_supervision_heads(tmp_path, tiny_model, tiny_checkpoint):
    """Fine-tuning a model without deep supervision with it: the saved weights plus the new
    model's fresh coarse heads; and back: those heads dropped. Nothing else may differ."""
    model, config = tiny_model
    out = export_weights(tiny_checkpoint, tmp_path / "w.safetensors")
    deep_config = replace(config.model, deep_supervision=2)
    deep = build_model(deep_config)
    state = init_state_dict(out, deep_config, aux_init=deep.state_dict())
    deep.load_state_dict(state)  # strict: every key there, none extra
    assert {k for k in state if k.startswith("aux_heads.")} == {f"aux_heads.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deep.eval()(x), model(x), atol=2e-2, rtol=0)  # fp16 storage
    deep_file = export_weights(write_checkpoint(tmp_path / "deep", deep, replace(config, model=deep_config)),
                               tmp_path / "deep.safetensors")
    plain = build_model(config.model)
    plain.load_state_dict(init_state_dict(deep_file, config.model))
    with pytest.raises(ValueError, match="decoder_width=16"):
        init_state_dict(deep_file, replace(deep_config, decoder_width=16))


def test_a_damaged_weights_file_is_refused_on_every_load(tmp_path):
    import shutil

    from raysegment.inference.predictor import Predictor
    from raysegment.model.checkpoint import DamagedWeights
    from raysegment.model.weights import init_state_dict, load_tensors, saved_config, shipped_weights

    good = shipped_weights("mobilenet_v2")
    load_tensors(good)  # intact: its digest matches
    bad = tmp_path / "copy.safetensors"
    shutil.copy(good, bad)
    data = bytearray(bad.read_bytes())
    for i in range(len(data) - 20_000, len(data) - 19_000):  # flip bytes inside the tensor data
        data[i] ^= 0xFF
    bad.write_bytes(bytes(data))
    for load in (lambda: load_tensors(bad), lambda: Predictor.load(str(bad)),
                 lambda: init_state_dict(bad, saved_config(good).model)):
        with pytest.raises(DamagedWeights, match="damaged"):
            load()


def test_seal_writes_the_digest_into_an_older_file_and_loading_checks_it(tmp_path, tiny_checkpoint, capsys):
    """``weights seal`` on a file exported before digests existed: the digest goes in, tensors and
    the rest of the metadata stay, and a later change to a tensor is refused on load."""
    from safetensors.torch import load_file, save_file

    from raysegment.cli import weights as weights_cli
    from raysegment.model.checkpoint import DamagedWeights
    from raysegment.model.weights import DIGEST_KEY, _metadata, load_weights_file

    out = tmp_path / "old.safetensors"
    assert weights_cli.main(["export", str(tiny_checkpoint), "--out", str(out)]) == 0
    meta, state = _metadata(out), load_file(str(out))
    del meta[DIGEST_KEY]
    save_file(state, str(out), metadata=meta)  # as an older raysegment wrote it
    assert weights_cli.main(["seal", str(out)]) == 0
    sealed = _metadata(out)
    assert sealed.pop(DIGEST_KEY) in capsys.readouterr().out and sealed == meta
    load_weights_file(out)
    state = load_file(str(out))
    first = next(iter(state))
    state[first] = state[first] + 1
    save_file(state, str(out), metadata={**meta, DIGEST_KEY: _metadata(out)[DIGEST_KEY]})
    with pytest.raises(DamagedWeights):
        load_weights_file(out)


def test_export_of_a_run_folder_takes_its_latest_epoch_and_a_wrong_path_is_one_line(tmp_path, tiny_model, capsys):
    """A run folder holds rotating ``checkpoint_<time>`` folders: the shipped file is the latest
    epoch's, whatever the names' order; a path that is neither kind: one error line, exit 2."""
    from raysegment.cli import weights as weights_cli
    from raysegment.model.weights import load_weights_file

    model, config = tiny_model
    run = tmp_path / "run"
    for name, epoch in (("checkpoint_2026-12-02_10-00-00.0", 7), ("checkpoint_2026-12-02_11-00-00.0", 5)):
        write_checkpoint(run / name, model, config, {"epoch": epoch})
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    out = tmp_path / "w" / "m.safetensors"
    assert weights_cli.main(["export", str(run), "--out", str(out)]) == 0
    assert load_weights_file(out).state == {"epoch": 7} and "epoch 8)" in capsys.readouterr().out
    # Everywhere a model is named, a run folder means its latest epoch (a run in progress can be looked at).
    from raysegment.inference.predictor import load_model
    from raysegment.model.weights import saved_state

    assert load_model(str(run)).state == {"epoch": 7} and saved_state(run) == {"epoch": 7}
    import argparse

    from raysegment.cli.args import check_models

    check_models(argparse.ArgumentParser(), [str(run)], None)  # infer, serve, report take it (they refused it)
    assert weights_cli.main(["export", str(run / "checkpoint_manager_snapshot.json"), "--out", str(tmp_path / "x")]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_tensors_beyond_fp16_range_stay_fp32_and_a_nan_checkpoint_is_refused(tmp_path, tiny_model, capsys):
    """DenseNet-121 trained from scratch grew BatchNorm running variances above 65504: in fp16 they
    became inf and the exported model predicted nothing. Such tensors are kept fp32; NaN is refused."""
    from raysegment.cli import weights as weights_cli

    model, config = tiny_model
    name, norm = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        norm.running_var.mul_(1e6)
        norm.running_mean.add_(300.0)
    ckpt = write_checkpoint(tmp_path / "ckpt", model, config, {"epoch": 0})
    out = export_weights(ckpt, tmp_path / "big.safetensors")
    loaded = load_weights_file(out)
    assert torch.isfinite(loaded.model.state_dict()[f"{name}.running_var"]).all()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), atol=2e-2, rtol=0)
    with torch.no_grad():
        norm.running_var[0] = float("nan")
    bad = write_checkpoint(tmp_path / "bad", model, config, {"epoch": 0})
    assert weights_cli.main(["export", str(bad), "--out", str(tmp_path / "nan.safetensors")]) == 2
    assert "NaN or inf" in capsys.readouterr().err and not (tmp_path / "nan.safetensors").exists()
    # A file exported before this fix (inf in fp16) is refused on load instead of predicting nothing.
    from safetensors.torch import load_file, save_file

    from raysegment.model.checkpoint import DamagedWeights, state_digest
    from raysegment.model.weights import _metadata

    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(out)).items()}
    meta = {**_metadata(out), "tensors_sha256": state_digest(tensors)}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(DamagedWeights, match="NaN or inf"):
        load_weights_file(tmp_path / "old.safetensors")


def test_every_weights_command_says_what_is_wrong_with_its_input_in_one_line(tmp_path, capsys):
    """``seal``, ``export-onnx`` and ``verify`` on a file that is not there, not a weights file, or a
    folder without SHA256SUMS: one error line and exit 2 (they printed tracebacks)."""
    from raysegment.cli import weights as weights_cli

    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a weights file")
    cases = {("seal", str(tmp_path / "none.safetensors")): "No such file",
             ("seal", str(junk)): "not a .safetensors file",
             ("export-onnx", str(junk), "--out", str(tmp_path / "x.onnx")): "not a .safetensors file",
             ("export-onnx", "shipped:resnet", "--out", str(tmp_path / "x.onnx")): "no shipped weights for 'resnet'",
             ("verify", "--folder", str(tmp_path)): "no SHA256SUMS there"}
    for argv, message in cases.items():
        assert weights_cli.main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "x.onnx").exists()
