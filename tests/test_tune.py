import pytest

from raysegment.cli.tune import _parse_fixed
from raysegment.config import TrainConfig
from raysegment.training.tune import SEARCHED, apply_params, search_space


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


class _Result:
    """What trial_table reads of a Ray Tune result: its config and per-epoch metrics."""

    def __init__(self, config, rows):
        import pandas as pd

        self.config = config
        self.metrics_dataframe = pd.DataFrame(rows) if rows is not None else None


def test_trial_table_ranks_trials_by_their_best_epoch():
    from raysegment.training.tune import trial_table

    def epoch(e, mean, path):
        return {"epoch": e, "dice_rv": mean - 0.01, "dice_myo": mean, "dice_lv": mean + 0.01, "dice_mean": mean,
                "checkpoint_path": path}

    results = [_Result({"lr": 1e-3, "decoder_width": 16}, [epoch(0, 0.5, "a0"), epoch(1, 0.7, "a1"), epoch(2, 0.6, "a2")]),
               _Result({"lr": 3e-3, "decoder_width": 32}, [epoch(0, 0.8, "b0")]),
               _Result({"lr": 1e-2}, None)]  # a trial that never reported
    table = trial_table(results)
    assert [(r["lr"], r["best_epoch"], r["epochs"], r["checkpoint_path"]) for r in table] == [
        (3e-3, 0, 1, "b0"), (1e-3, 1, 3, "a1")]
    assert table[1]["dice_mean"] == 0.7 and table[1]["dice_rv"] == pytest.approx(0.69)
    assert table[0]["decoder_width"] == 32
    # The search's closing table names the epoch whose Dice (and checkpoint) it shows, as the epoch lines count.
    from raysegment.cli.tune import trial_lines

    assert trial_lines(table)[1] == ("  decoder_width=16 lr=0.001 epochs=3 best epoch 2 -> dice rv 0.690 myo 0.700 "
                                     "lv 0.710 mean 0.700")


def test_a_resumed_search_registers_nothing_twice(tmp_path):
    """Running an interrupted search again goes through registration again: the MLflow run records
    what it registered (tag ``registered``), so the registry gets no second version."""
    from mlflow import MlflowClient

    from raysegment.registry.champion import Registration
    from raysegment.training.tune import _register_once

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    calls = []

    def register():
        calls.append(1)
        return Registration(name="m", version=str(len(calls)), champion=True, reason="no champion yet")

    first = _register_once(client, run_id, register)
    assert _register_once(client, run_id, register) == first == {"name": "m", "version": "1", "champion": True,
                                                                   "reason": "no champion yet"}
    assert len(calls) == 1
