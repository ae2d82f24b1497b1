from dataclasses import replace

import pytest

from raysegment.cli.tune import _parse_fixed
from raysegment.config import TrainConfig
from raysegment.training.train import RunSpec
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
    with pytest.raises(ValueError, match="NAME=VALUE"):
        _parse_fixed(["batch=3"])


def _bounds(domain):
    return tuple(domain.categories) if hasattr(domain, "categories") else (domain.lower, domain.upper)


def test_range_narrows_a_searched_parameter_and_bad_ones_are_one_line():
    from raysegment.cli.tune import _parse_ranges

    default = {k: _bounds(v) for k, v in search_space().items()}
    assert list(default) == list(SEARCHED) and default == {  # the defaults, as searched before --range existed
        "dice_fraction": (0.1, 0.9), "w_rv": (0.5, 2.0), "w_myo": (0.5, 2.0), "w_lv": (0.5, 2.0),
        "decoder_width": (16, 32, 48), "lr": (3e-4, 6e-3)}
    ranges = _parse_ranges(["lr=1e-4:1e-2", "decoder_width=16,24", "dice_fraction=0:0.5"], {"w_rv": 1.0})
    assert ranges == {"lr": (1e-4, 1e-2), "decoder_width": (16, 24), "dice_fraction": (0.0, 0.5)}
    space = search_space(ranges)
    assert list(space) == list(SEARCHED) and "LogUniform" in type(space["lr"].sampler).__name__
    assert {k: _bounds(v) for k, v in space.items()} == {**default, **ranges}
    for item, says in (("lr=0:1e-2", "0 < LOW < HIGH ≤ 1"), ("dice_fraction=0.5:1.2", "0 ≤ LOW < HIGH ≤ 1"),
                       ("w_rv=2:1", "0 < LOW < HIGH"), ("decoder_width=16.5", "widths ≥ 1"), ("batch=1:2", "not searched"),
                       ("lr=abc", "expected NAME=LOW:HIGH"), ("lr", "expected NAME=LOW:HIGH")):
        with pytest.raises(ValueError, match=f"--range '{item}': .*{says}"):
            _parse_ranges([item], {})
    with pytest.raises(ValueError, match="--set pins w_rv"):
        _parse_ranges(["w_rv=1:2"], {"w_rv": 1.0})


def test_a_pinned_value_outside_its_limits_is_one_line():
    """``--set`` took any number: ``lr=-1`` failed in every trial's workers (AdamW refuses it), the
    three class weights at 0 gave a NaN loss, ``decoder_width=12.5`` ended in int()'s own words. Now
    the limits a range must lie in."""
    from raysegment.cli.tune import _parse_fixed

    assert _parse_fixed(["lr=1e-3", "decoder_width=16", "dice_fraction=0", "w_lv=2.5"]) == {
        "lr": 1e-3, "decoder_width": 16, "dice_fraction": 0.0, "w_lv": 2.5}
    for item, says in (("lr=-1", "lr takes 0 < VALUE ≤ 1, got -1"), ("w_rv=0", "w_rv takes 0 < VALUE, got 0"),
                       ("dice_fraction=1.5", "0 ≤ VALUE ≤ 1"), ("decoder_width=12.5", "whole width ≥ 1, got 12.5"),
                       ("w_myo=abc", "takes a number, got 'abc'"), ("batch=2", "expected NAME=VALUE")):
        with pytest.raises(ValueError, match=f"--set '{item}': .*{says}"):
            _parse_fixed([item])


def test_a_search_resumes_only_with_what_it_began_with(tmp_path):
    """Tune resumes a saved search with its own space and trial count: a resume asking for others, or
    for other trial settings, is refused in one line, before any trial; the same command, or a search
    saved before these were recorded, resumes."""
    import json

    from mlflow import MlflowClient

    from raysegment.training.tune import SearchSpaceChanged, TuneSpec, _parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = TuneSpec(base=TrainConfig(data="x", manifest_hash="h"), run=RunSpec(name="s", storage_path=str(tmp_path)),
                    tracking_uri=uri, fixed={"w_rv": 1.0}, ranges={"lr": (1e-4, 1e-2)})
    exp_id, run_id, planned = _parent_run(spec)
    assert planned == spec.num_samples and MlflowClient(uri).get_run(run_id).data.params["range_lr"] == "0.0001:0.01"
    # Tune resumes a search with the trial count it began with (and would ignore another)
    with pytest.raises(SearchSpaceChanged, match=f"^search s began with --num-samples {planned}, not {planned + 4}: "
                                                 "resume it with that, or give a new --name$"):
        _parent_run(replace(spec, num_samples=planned + 4))
    began = "search s began with --set w_rv=1 --range lr=0.0001:0.01, not "
    for other, now in (({"ranges": {"lr": (1e-4, 1e-3)}}, "--set w_rv=1 --range lr=0.0001:0.001"),
                       ({"ranges": {}}, "--set w_rv=1"), ({"fixed": {}, "ranges": {}}, "no --set or --range")):
        with pytest.raises(SearchSpaceChanged, match=f"^{began}{now}: resume it with those, or give a new --name$"):
            _parent_run(replace(spec, **other))
    # the trials' other settings: resumed and new trials would take new ones, so they are refused too
    with pytest.raises(SearchSpaceChanged, match=r"^search s began with other settings \(batch_size 8, now 16\): "
                                                 "resume it with those, or give a new --name$"):
        _parent_run(replace(spec, base=replace(spec.base, batch_size=16)))
    with pytest.raises(SearchSpaceChanged, match=r"\(epochs 20, now 3\)"):  # ASHA's last rung is the first --epochs
        _parent_run(replace(spec, base=replace(spec.base, epochs=3)))
    assert _parent_run(replace(spec, base=replace(spec.base, threads_per_worker=1, data="y")))[1] == run_id
    # a marker saved before the space, count and settings were: accepted, the count from the parent run
    marker = tmp_path / "s" / "mlflow_parent_run.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k in ("tracking_uri", "run_id")}))
    assert _parent_run(replace(spec, ranges={}, num_samples=1)) == (exp_id, run_id, planned)


def test_a_search_that_tune_stopped_on_ctrl_c_is_unfinished():
    """Tune returns from a search it stopped with the trials it had, marked TERMINATED: the search is
    finished only when it has every planned trial and each ended (``done``) or failed."""
    from types import SimpleNamespace

    from raysegment.training.trials import unfinished

    def trial(done=None, error=None):
        return SimpleNamespace(metrics={"epoch": 0, **({"done": done} if done is not None else {})}, error=error)

    ended, stopped_by_asha, failed = trial(done=True), trial(done=True), trial(error=RuntimeError("oom"))
    assert not unfinished([ended, stopped_by_asha, failed], planned=3)
    assert unfinished([ended, stopped_by_asha], planned=3)  # the third never started
    assert unfinished([ended, trial(done=False), failed], planned=3)  # one stopped mid-run
    assert unfinished([ended, trial(), failed], planned=3)  # nor had it reported


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
               _Result({"lr": 1e-2}, None),  # a trial that never reported
               # equal scores: the latest, the checkpoint Ray Train keeps of them (the first was taken,
               # whose folder Ray had deleted: the registration's FileNotFoundError after the search)
               _Result({"lr": 5e-2}, [epoch(0, 0.2, "c0"), epoch(1, 0.3, "c1"), epoch(2, 0.3, "c2"), epoch(3, 0.3, "c3")])]
    table = trial_table(results)
    assert [(r["lr"], r["best_epoch"], r["epochs"], r["checkpoint_path"]) for r in table] == [
        (3e-3, 0, 1, "b0"), (1e-3, 1, 3, "a1"), (5e-2, 3, 4, "c3")]
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
                                                                   "reason": "no champion yet", "new": True}
    assert len(calls) == 1


def test_a_finished_search_is_told_apart_from_one_with_work_left(tmp_path):
    """``finished_search``: the summary a search left once it ended, unless the command now asks for
    a stage it did not run (a registration, a final run) or another registry; a search begun but
    not ended has none. Such a re-run prints the summary without Ray (16.5 s → 3.2 s)."""
    import json

    from raysegment.training.tune import SUMMARY, TuneSpec, _parent_run, finished_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = TuneSpec(base=TrainConfig(data="x", manifest_hash="h"), run=RunSpec(name="s", storage_path=str(tmp_path)),
                    tracking_uri=uri, register=False)
    assert finished_search(spec) is None  # not begun
    _, run_id, _ = _parent_run(spec)
    assert finished_search(spec) is None  # begun, not ended
    summary = {"parent_run_id": run_id, "trials": [{"trial_id": "a", "dice_mean": 0.9}], "errors": 0}
    (tmp_path / "s" / SUMMARY).write_text(json.dumps(summary))
    assert finished_search(spec) == summary
    assert finished_search(replace(spec, register=True)) is None  # it registered nothing then
    assert finished_search(replace(spec, final_minutes=5.0)) is None  # nor ran a final stage
    assert finished_search(replace(spec, tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")) is None
    (tmp_path / "s" / SUMMARY).write_text(json.dumps({**summary, "registered": {"version": "1"}, "final": {"epochs": 3}}))
    assert finished_search(replace(spec, register=True, final_minutes=5.0))["final"] == {"epochs": 3}
    (tmp_path / "s" / SUMMARY).write_text('{"parent_run_id": "ab')  # cut short by a full disk
    assert finished_search(spec) is None


def test_a_search_that_fails_is_failed_in_mlflow(tmp_path, monkeypatch):
    """A search whose Tune run raises (a full disk, a bug) ends its MLflow parent run FAILED, not
    RUNNING for ever in the UI; the error itself propagates."""
    import errno

    from mlflow import MlflowClient

    from raysegment.training import tune as tune_mod

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text('{"content_hash": "h"}')

    class Broken:
        def fit(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tune_mod, "_tuner", lambda *args: Broken())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tune_mod.TuneSpec(base=TrainConfig(data=str(tmp_path / "shards")),
                             run=RunSpec(name="s", storage_path=str(tmp_path / "runs")), tracking_uri=uri)
    with pytest.raises(OSError, match="No space left"):
        tune_mod.run_search(spec)
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name(spec.experiment).experiment_id])
    assert parent.info.status == "FAILED"


def test_trial_lines_tell_an_asha_stop_from_a_trial_that_ran_its_epochs(capsys):
    from types import SimpleNamespace

    from raysegment.training.tune import TrialLines

    lines = TrialLines(total=3, max_epochs=3)
    dice = {"dice_rv": 0.9, "dice_myo": 0.8, "dice_lv": 0.95, "dice_mean": 0.883}
    for trial_id, epoch in (("a", 0), ("b", 2)):  # 'epoch' counts from 0
        lines.on_trial_complete(0, [], SimpleNamespace(trial_id=trial_id, last_result={**dice, "epoch": epoch}))
    lines.on_trial_complete(0, [], SimpleNamespace(trial_id="c", last_result={}))
    out = capsys.readouterr().out.splitlines()
    assert out == ["[raysegment] trial a stopped by ASHA after 1 of 3 epochs: rv 0.900 myo 0.800 lv 0.950 mean 0.883 "
                   "(1 of 3 done)",
                   "[raysegment] trial b ended after 3 epochs: rv 0.900 myo 0.800 lv 0.950 mean 0.883 (2 of 3 done)",
                   "[raysegment] trial c ended after 0 epochs: no result (3 of 3 done)"]
    single = TrialLines(total=1, max_epochs=1)
    single.on_trial_complete(0, [], SimpleNamespace(trial_id="d", last_result={"epoch": 0}))
    assert "trial d ended after 1 epoch: no result" in capsys.readouterr().out
