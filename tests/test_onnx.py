"""ONNX: the export carries the model's config, and the Predictor on ONNX Runtime gives the masks
of the torch fp32 Predictor (same normalisation, grid, context and post-processing)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_checkpoint
from synth import synthetic_volume


@pytest.fixture
def context_checkpoint(tmp_path):
    """A tiny 2.5-D model (one neighbour slice each side) on a 1.5 mm pixel grid."""
    import torch

    from raysegment.config import ModelConfig, TrainConfig
    from raysegment.model.unet import build_model

    torch.manual_seed(3)
    config = TrainConfig(data="unused", model=ModelConfig(backbone="mobilenet_v2", decoder_width=8, context_slices=1),
                         pixel_mm=1.5)
    return write_checkpoint(tmp_path / "ckpt25", build_model(config.model).eval(), config)


@pytest.mark.parametrize("which", ["tiny_checkpoint", "context_checkpoint"])
def test_onnx_runtime_masks_equal_torch_fp32(which, request):
    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor

    ckpt = request.getfixturevalue(which)
    image = synthetic_volume(5, shape=(5, 70, 83))[0] * 700.0  # sizes off the 32-pixel grid on purpose
    torch_fp32 = Predictor.load(str(ckpt), PredictConfig(precision="fp32"))
    onnx = Predictor.load(str(ckpt), PredictConfig(runtime="onnx"))
    assert onnx.config.precision == "fp32" and onnx.version == torch_fp32.version
    spacing = (8.0, 1.3, 1.3)
    p_torch, p_onnx = (p.probabilities(image, spacing=spacing) for p in (torch_fp32, onnx))
    assert np.abs(p_torch - p_onnx).max() < 1e-3
    assert (torch_fp32.predict(image, spacing=spacing) == onnx.predict(image, spacing=spacing)).mean() >= 0.999


def test_export_onnx_writes_a_file_that_loads_with_its_config(tiny_checkpoint, tmp_path, capsys):
    from raysegment.cli import weights
    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor, load_model
    from raysegment.model.weights import saved_config

    out = tmp_path / "tiny.onnx"
    assert weights.main(["export-onnx", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert "tiny.onnx" in capsys.readouterr().out
    loaded = load_model(str(out))
    assert loaded.config == saved_config(tiny_checkpoint) == saved_config(out)
    assert loaded.version.startswith("file:tiny.onnx:") and loaded.state["source_version"].startswith("file:ckpt:")
    image = synthetic_volume(6, shape=(4, 64, 64))[0]
    from_file = Predictor(loaded).predict(image)
    assert np.array_equal(from_file, Predictor.load(str(tiny_checkpoint), PredictConfig(runtime="onnx")).predict(image))


def test_an_onnx_file_without_a_raysegment_config_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from raysegment.inference.predictor import load_model

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="without a raysegment config"):
        load_model(str(tmp_path / "other.onnx"))
