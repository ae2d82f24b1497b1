"""Configs: JSON round trip, configs saved by older raysegment versions, CLI defaults, thread policy."""

import pytest

from raysegment.config import AugmentConfig, LossConfig, ModelConfig, PredictConfig, TrainConfig, available_cpus, default_of, torch_threads


def test_round_trip_and_configs_saved_before_newer_fields():
    config = TrainConfig(data="x", model=ModelConfig(backbone="densenet121", decoder_width=16, context_slices=1),
                         loss=LossConfig(class_weights=(2.0, 1.0, 1.0)), val_patients=("patient001",))
    d = config.to_dict()
    assert TrainConfig.from_dict(d) == config
    del d["model"]["context_slices"]  # saved before 2.5-D input existed
    del d["intensity_percentiles"]  # saved before the normalisation was recorded
    d["augment"]["some_future_knob"] = 3  # saved by a newer raysegment: ignored
    old = TrainConfig.from_dict(d)
    assert old.model == ModelConfig(backbone="densenet121", decoder_width=16, context_slices=0)
    assert old.intensity_percentiles == (0.5, 99.5)
    assert old.augment == AugmentConfig()


def test_cli_defaults_come_from_the_configs():
    from raysegment.cli import infer as infer_cli
    from raysegment.cli import train, tune
    from raysegment.inference import batch as infer

    assert default_of(TrainConfig, "batch_size") == TrainConfig(data="x").batch_size
    assert default_of(TrainConfig, "model") == ModelConfig()
    args = train.build_parser().parse_args(["--data", "d"])
    assert (args.batch_size, args.lr, args.image_size, args.crop_size, args.epochs, args.precision) == (
        TrainConfig.batch_size, TrainConfig.lr, TrainConfig.image_size, TrainConfig.crop_size, TrainConfig.epochs,
        TrainConfig.precision)
    assert args.flip_prob == AugmentConfig.flip_prob and tuple(args.class_weights) == LossConfig.class_weights
    assert tune.build_parser().parse_args([]).batch_size == TrainConfig.batch_size
    a = infer_cli.build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o"])
    assert (a.batch_size, a.precision, a.actors, a.report_figures) == (
        PredictConfig.batch_size, PredictConfig.precision, infer.InferConfig.actors, infer.InferConfig.report_figures)
    with pytest.raises(KeyError):
        default_of(TrainConfig, "no_such_field")


def test_one_thread_policy():
    cores = available_cpus()
    assert torch_threads(3, processes=8) == 3  # explicit wins
    assert torch_threads(None, processes=1) == cores
    assert torch_threads(None, processes=cores * 4) == 1
    assert torch_threads(None, processes=cores * 4, cpus_per_process=2.0) == 2  # never below Ray's reservation
    with pytest.raises(ValueError):
        torch_threads(0, processes=1)
