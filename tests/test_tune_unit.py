from raysegment.train import TrainConfig
from raysegment.tune import SEARCHED, _parse_fixed, apply_params, search_space


def test_apply_params_maps_the_search_space_onto_the_config():
    base = TrainConfig(data="x")
    cfg = apply_params(base, {"dice_fraction": 0.25, "w_rv": 2.0, "w_myo": 0.5, "w_lv": 1.5, "decoder_width": 48,
                              "lr": 1e-3})
    assert (cfg.loss.ce_weight, cfg.loss.dice_weight) == (0.75, 0.25)
    assert cfg.loss.class_weights == (2.0, 0.5, 1.5)
    assert cfg.model.decoder_width == 48 and cfg.lr == 1e-3
    assert apply_params(base, {}) == base
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_search_space_and_pins():
    assert set(search_space()) == set(SEARCHED)
    assert _parse_fixed(["lr=0.01", "decoder_width=16"]) == {"lr": 0.01, "decoder_width": 16}
    import pytest
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        _parse_fixed(["batch=3"])
