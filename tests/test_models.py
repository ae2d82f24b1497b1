import pytest
import torch
import torchvision

from raysegment.models import MODELS, ModelConfig, WeightsNotFoundError, build_model

WEIGHT_FILES = {"densenet121": "densenet121-a639ec97.pth", "mobilenet_v2": "mobilenet_v2-7ebf99e0.pth"}
FIRST_CONV = {"densenet121": lambda m: m.features.conv0, "mobilenet_v2": lambda m: m.features[0][0]}
OUR_FIRST_CONV = {"densenet121": lambda u: u.encoder.stem[0], "mobilenet_v2": lambda u: u.encoder.stages[0][0][0]}


@pytest.mark.parametrize("backbone", sorted(MODELS))
def test_forward_backward_any_size(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, decoder_width=8))
    x = torch.randn(2, 1, 70, 90, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 4, 70, 90)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert float(model.head.weight.grad.abs().sum()) > 0
    assert float(OUR_FIRST_CONV[backbone](model).weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("backbone", sorted(MODELS))
def test_decoder_width_changes_the_decoder(backbone):
    small = build_model(ModelConfig(backbone=backbone, decoder_width=8))
    big = build_model(ModelConfig(backbone=backbone, decoder_width=32))
    assert big.blocks[0][0].out_channels == 4 * small.blocks[0][0].out_channels == 256


@pytest.mark.parametrize("backbone", sorted(MODELS))
def test_imagenet_weights_load_from_the_hub_cache(backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=WEIGHT_FILES[backbone]) as err:
        build_model(ModelConfig(backbone=backbone), weights="imagenet")
    assert str(tmp_path / "hub" / "checkpoints") in str(err.value)

    torch.manual_seed(123)
    reference = getattr(torchvision.models, backbone)(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / WEIGHT_FILES[backbone])
    model = build_model(ModelConfig(backbone=backbone), weights="imagenet")
    expected = FIRST_CONV[backbone](reference).weight.sum(dim=1, keepdim=True)
    torch.testing.assert_close(OUR_FIRST_CONV[backbone](model).weight, expected)
    random_init = build_model(ModelConfig(backbone=backbone), weights=None)
    assert not torch.allclose(OUR_FIRST_CONV[backbone](random_init).weight, expected)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model(ModelConfig(backbone="resnet9000"))


def test_keep_largest_component_drops_islands_per_label():
    import numpy as np

    from raysegment.models import keep_largest_component

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
    import numpy as np

    from raysegment.models import keep_largest_component

    m = np.zeros((3, 40, 40), np.uint8)
    m[:, 10:20, 10:20] = 2       # MYO ring (filled square here)
    m[:, 13:17, 13:17] = 3       # LV cavity inside it
    m[:, 10:20, 21:25] = 1       # true RV: small, 1 px from the myocardium
    m[:, 32:40, 0:20] = 1        # false RV: larger, far below the heart
    out = keep_largest_component(m)
    assert (out[:, 10:20, 21:25] == 1).all() and not (out[:, 32:40, 0:20] == 1).any()
    # Without a heart to touch, the largest RV component wins as before.
    no_heart = np.where(m == 1, 1, 0).astype(np.uint8)
    out2 = keep_largest_component(no_heart)
    assert (out2[:, 32:40, 0:20] == 1).all() and not (out2[:, 10:20, 21:25] == 1).any()
    np.testing.assert_array_equal(keep_largest_component(out), out)
