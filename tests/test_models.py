import pytest
import torch
import torchvision

from raysegment.model.unet import BACKBONES, ENCODERS, ModelConfig, WeightsNotFoundError, build_model, first_conv_key, with_context

WEIGHT_FILES = {"densenet121": "densenet121-a639ec97.pth", "mobilenet_v2": "mobilenet_v2-7ebf99e0.pth"}
FIRST_CONV = {"densenet121": lambda m: m.features.conv0, "mobilenet_v2": lambda m: m.features[0][0]}
OUR_FIRST_CONV = {"densenet121": lambda u: u.encoder.stem[0], "mobilenet_v2": lambda u: u.encoder.stages[0][0][0]}


@pytest.mark.parametrize("backbone", BACKBONES)
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


@pytest.mark.parametrize("backbone", BACKBONES)
def test_context_slices_take_neighbours_as_channels(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, decoder_width=8, context_slices=1))
    conv = OUR_FIRST_CONV[backbone](model)
    assert conv.in_channels == 3
    # A fresh 2.5-D model starts as its 2-D self: neighbour kernels are zero.
    assert not conv.weight[:, 0].any() and not conv.weight[:, 2].any()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    assert float(conv.weight.grad[:, 0].abs().sum()) > 0 and float(conv.weight.grad[:, 2].abs().sum()) > 0
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="context_slices"):
        build_model(ModelConfig(backbone=backbone, context_slices=2))


def test_with_context_stacks_neighbours_and_zero_pads():
    vol = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3) + 1
    x = with_context(vol, 1)
    assert x.shape == (4, 3, 2, 3)
    for k in range(4):
        assert torch.equal(x[k, 1], vol[k])
        assert torch.equal(x[k, 0], vol[k - 1] if k > 0 else torch.zeros(2, 3))
        assert torch.equal(x[k, 2], vol[k + 1] if k < 3 else torch.zeros(2, 3))
    assert torch.equal(with_context(vol, 0), vol[:, None])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_decoder_width_changes_the_decoder(backbone):
    small = build_model(ModelConfig(backbone=backbone, decoder_width=8))
    big = build_model(ModelConfig(backbone=backbone, decoder_width=32))
    assert big.blocks[0][0].out_channels == 4 * small.blocks[0][0].out_channels == 256


@pytest.mark.parametrize("backbone", BACKBONES)
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


def test_the_encoder_registry_is_the_one_list_of_backbones():
    import argparse

    from raysegment.cli import bench, train, tune

    assert BACKBONES == tuple(sorted(ENCODERS)) == ("densenet121", "mobilenet_v2")
    for parser in (train.build_parser(), tune.build_parser()):
        action = next(a for a in parser._actions if a.dest == "backbone")
        assert tuple(action.choices) == BACKBONES
    sub = next(a for a in bench.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "infer"):
        assert tuple(next(a for a in sub.choices[name]._actions if a.dest == "backbone").choices) == BACKBONES
    for backbone in BACKBONES:  # the 2.5-D widening path names a real parameter of each U-Net
        model = build_model(ModelConfig(backbone=backbone, decoder_width=8, context_slices=1))
        assert model.state_dict()[first_conv_key(backbone)].shape[1] == 3


def test_deep_supervision_adds_coarse_heads_that_prediction_ignores():
    """Heads at strides 2 and 4 in training (⌈H/s⌉×⌈W/s⌉ logits, trained by the backward pass);
    without ``aux`` the model is, weight for weight, the one without them."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig(decoder_width=8)).eval()
    torch.manual_seed(0)
    deep = build_model(ModelConfig(decoder_width=8, deep_supervision=2)).eval()
    x = torch.randn(2, 1, 70, 90)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), plain(x), atol=0, rtol=0)
    levels = deep.train()(x, aux=True)
    assert [tuple(z.shape) for z in levels] == [(2, 4, 70, 90), (2, 4, 35, 45), (2, 4, 18, 23)]
    sum(z.square().mean() for z in levels[1:]).backward()
    assert all(float(h.weight.grad.abs().sum()) > 0 for h in deep.aux_heads)
    assert deep.head.weight.grad is None  # the coarse heads alone do not reach the full-resolution one
    with pytest.raises(ValueError, match="deep_supervision must be 0 to 3"):
        build_model(ModelConfig(decoder_width=8, deep_supervision=4))
